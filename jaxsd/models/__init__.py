"""The networks, as pure ``flax.linen`` modules: no files, no sampling, nothing else of jaxsd.

Parameters are plain pytrees passed to ``model.apply``; each model's frozen config dataclass is
built from the checkpoint's ``config.json`` by one classmethod. Arrays are NHWC throughout.
Read ``layers.py`` first, then ``clip.py``, ``vae.py``, ``transformer.py``, ``unet.py``.
Loading weights into them is ``jaxsd.checkpoints``' job.
"""
