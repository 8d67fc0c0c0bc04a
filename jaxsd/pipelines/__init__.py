"""Pipelines compose the models, the checkpoints and the sampling loop into images.

    images.py             image and mask pre/post-processing (diffusers' VaeImageProcessor)
    encoding.py           prompts -> embeddings, pixels <-> scaled latents, the guided denoiser
    stable_diffusion.py   StableDiffusion: text_to_image, image_to_image, inpaint
    stable_diffusion_xl.py  StableDiffusionXL: the same, with SDXL's two encoders and micro-conditioning
"""
