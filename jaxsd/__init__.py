"""jaxsd: a readable, exact and fast JAX implementation of Stable Diffusion."""
