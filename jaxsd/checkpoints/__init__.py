"""Reading checkpoints into jaxsd's models, without torch (pickles only on request).

    files.py          config.json and safetensors files of a component folder
    convert.py        every rename from PyTorch keys to our parameter paths, as tables
    components.py     one component folder -> (model, params)
    tokenizer.py      prompts -> CLIP token ids
    ldm_keys.py, ldm_arch.py, single_file.py   original (CompVis) single-file checkpoints
    sources.py        a built-in name, folder, Hub id or single file -> every component

It imports ``jaxsd.models`` (to know which parameters a model wants) and nothing else of jaxsd.
"""
