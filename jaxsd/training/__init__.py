"""Training the built-in tiny model from scratch (``jaxsd train-tiny``; docs/tiny_model.md).

    shapes.py     the synthetic dataset: one coloured shape, its caption, the held-out prompts
    evaluate.py   the judge that scores generated images against their prompts
    recipe.py     the tiny model and training configs, losses and the jitted steps
    loop.py       data prefetch, resumable checkpoints, the loop
    export.py     writing the trained model as a diffusers folder

It may use every other part of jaxsd; only ``jaxsd.cli`` imports it, so ``import jaxsd`` never
loads optax or the training code.
"""
