"""Training a tiny Stable Diffusion from scratch on the shapes dataset (issue 7).

Two stages, each a jitted step over an explicit :class:`TrainState` (the loop that runs them,
with data, checkpoints and export, is :func:`jaxsd.training.loop.run_stage`):

    stage "vae"   the autoencoder alone: images x -> q(z|x) -> z -> x_hat
                  loss = L1 weighted on the outline (x, x_hat) + kl_weight * mean KL(q(z|x) || N(0, I))
    stage "unet"  the CLIP text encoder and the UNet together, on latents of the frozen VAE:
                  z0 = scaling_factor * z,  z ~ q(z|x)
                  t ~ U{0, ..., 999},  eps ~ N(0, I)
                  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps               (Ho et al., 2020, eq. 4)
                  loss = mean || eps - eps_theta(z_t, t, CLIP(caption)) ||^2  (Ho et al., 2020, eq. 14)
                  or, with v-prediction, the same error on v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0
                  (Salimans & Ho, 2022), which FULL trains on a zero-terminal-SNR schedule
                  with the caption replaced by "" 10% of the time, so that the same network also
                  learns eps_theta(z_t, t, "") for classifier-free guidance (Ho & Salimans, 2022),
                  + attribute_weight * cross-entropy of a linear probe that reads the caption's
                  colours and shape from the pooled text vector (see attribute_loss: without it
                  the text encoder collapsed to a constant and the UNet ignored the prompt)

The text encoder has no separate pre-training: a contrastive stage, as CLIP's own, would need an
image tower thrown away afterwards; the probe is a linear layer, thrown away too, and costs
nothing. See ``docs/tiny_model.md`` for the design, the size budget and measured speeds.

Data comes from :class:`jaxsd.training.shapes.ShapesDataset`: batch i is a pure function of (seed, i),
so a resumed run sees exactly the data of an uninterrupted one (see :mod:`jaxsd.training.loop`).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsd.checkpoints import convert
from jaxsd.models.clip import CLIPTextConfig, CLIPTextModel
from jaxsd.models.unet import UNet, UNetConfig
from jaxsd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from jaxsd.training.shapes import COLOR_NAMES, POSITION_NAMES, SHAPES, SIZE_NAMES, ShapesDataset

STAGES = ("vae", "unet")


# ---------------------------------------------------------------------------------------------
# The tiny model, as config instances.

@dataclasses.dataclass(frozen=True)
class TinyModelConfig:
    """The three networks of the tiny model; see docs/tiny_model.md for the size budget."""
    vae: VAEConfig = VAEConfig(
        block_out_channels=(16, 32, 64),  # three levels: f = 4, 64 x 64 pixels -> 16 x 16 latents;
        layers_per_block=1,               # narrow at full resolution, where the FLOPs are
        norm_num_groups=8,
        scaling_factor=1.0)               # replaced by 1 / std of the trained VAE's latents
    text: CLIPTextConfig = CLIPTextConfig(
        hidden_size=64,                   # the 49,408-row token table is 3.2M of the 3.4M parameters
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4)            # head size 16
    unet: UNetConfig = UNetConfig(
        block_out_channels=(32, 64, 64),  # at 16 x 16, 8 x 8, 4 x 4 latent pixels
        layers_per_block=(1, 1, 1),
        down_attention=(True, True, False),  # cross-attention where SD has it: all but the lowest
        up_attention=(True, True, False),    # level, plus the mid block
        heads=(2, 4, 4),                  # head size 16
        transformer_depth=(1, 1, 1),
        cross_attention_dim=64,           # = text.hidden_size
        norm_num_groups=8,
        time_embedding_dim=128)           # 4 x block_out_channels[0], as SD


TINY = TinyModelConfig()

# A model small enough to compile and train a few steps in CI (XLA's CPU compile of the training
# step dominates: a minute for the three-level UNet): the same parts, one level fewer in the UNet.
SMOKE_MODEL = TinyModelConfig(
    vae=VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0),
    text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    unet=UNetConfig(block_out_channels=(16, 32), layers_per_block=(1, 1),
                    down_attention=(True, False), up_attention=(True, False),
                    heads=(2, 4), transformer_depth=(1, 1), cross_attention_dim=32,
                    norm_num_groups=8, time_embedding_dim=64))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one stage."""
    steps: int = 20_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 500            # linear warmup, then cosine decay to 10% of the peak
    weight_decay: float = 0.01         # AdamW, on kernels and embeddings only (not norms, biases)
    grad_clip: float = 1.0             # global gradient norm
    ema_decay: float = 0.999           # exponential moving average of the weights, which we ship
    kl_weight: float = 1e-5            # VAE only: weight of the per-element KL term
    caption_dropout: float = 0.1       # UNet only: share of captions replaced by ""
    noise_offset: float = 0.0          # UNet only: std of a per-image, per-channel constant added
                                       # to the noise (offset noise; see diffusion_loss)
    attribute_weight: float = 0.1      # UNet only: weight of the caption-attribute loss (see
                                       # attribute_loss); 0 turns it off
    cycle_steps: int | None = None     # restart the cosine every this many steps, at half the
                                       # previous peak (SGDR, Loshchilov & Hutter, 2017); None: one
    edge_weight: float = 0.0           # VAE only: extra L1 weight on pixels within 1.5 px of the
                                       # shape's outline (see vae_loss); 0: plain L1
    min_snr_gamma: float | None = None  # UNet only: Min-SNR-gamma loss weights (Hang et al., 2023;
                                       # see snr_weight); None: every timestep weighs the same
    prediction_type: str = "epsilon"   # UNet only: what it predicts, "epsilon" or "v_prediction"
    zero_terminal_snr: bool = False    # UNet only: rescale the schedule so that abar_999 = 0
                                       # (Lin et al., 2024, Alg. 1); needs v_prediction
    latent_pool: int = 0               # UNet only: encode this many scenes once with the frozen
                                       # VAE and draw batches from them (see loop.latent_pool);
                                       # 0: render and encode every batch
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"TrainConfig: caption_dropout={self.caption_dropout} must be in [0, 1)")
        if not self.edge_weight >= 0:
            raise ValueError(f"TrainConfig: edge_weight={self.edge_weight} must be >= 0")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"TrainConfig: min_snr_gamma={self.min_snr_gamma} must be > 0, or None")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"TrainConfig: prediction_type={self.prediction_type!r}; choose one of "
                             f"{list(PREDICTION_TYPES)}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("TrainConfig: zero_terminal_snr=True needs prediction_type='v_prediction' "
                             "(at abar = 0 the noise is the whole input: predicting it says nothing)")
        if self.latent_pool < 0:
            raise ValueError(f"TrainConfig: latent_pool={self.latent_pool} must be >= 0")


PREDICTION_TYPES = ("epsilon", "v_prediction")


# Presets: the full run, which made the shipped tiny-shapes (docs/tiny_model.md, "The v2
# recipe"), and the CI smoke run.
FULL = {"vae": TrainConfig(steps=1_000, batch_size=16, learning_rate=2e-3, warmup_steps=50,
                          ema_decay=0.99, edge_weight=10.0),
        # v-prediction on a zero-terminal-SNR schedule: the first recipe that made the position
        # words move what the UNet draws (docs/tiny_model.md, "Why position fails"). 8,000 steps,
        # not 5,000: the colours reach 95% and circles stop coming out as rounded squares
        # (docs/tiny_model.md, "The full run"); about 2 h 10 min in all on a 2-core CPU.
        "unet": TrainConfig(steps=8_000, batch_size=32, learning_rate=1e-3, warmup_steps=200,
                            prediction_type="v_prediction", zero_terminal_snr=True,
                            latent_pool=32_768)}
# The diffusers scheduler the exported folder names as its default. Not SD 1.5's PNDM: on the
# tiny model the linear multistep samplers (PNDM, LMS) get the colours right a third of the time,
# Euler nearly always (docs/tiny_model.md, "Quality").
SCHEDULER = "EulerDiscreteScheduler"
SMOKE = {"vae": TrainConfig(steps=30, batch_size=8, learning_rate=2e-3, warmup_steps=5, edge_weight=10.0),
         "unet": TrainConfig(steps=30, batch_size=8, learning_rate=2e-3, warmup_steps=5,
                             noise_offset=0.3)}


# ---------------------------------------------------------------------------------------------
# The noise schedule (Rombach et al., 2022: "scaled_linear", as SD 1.x/2.x).

def scaled_linear_alphas_cumprod(beta_start=0.00085, beta_end=0.012, steps=1000,
                                 zero_terminal_snr: bool = False) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s), with beta_t = linspace(sqrt(b0), sqrt(b1), T)^2 (float64).

    ``zero_terminal_snr``: the betas rescaled so that abar_T = 0 (Lin et al., 2024, Alg. 1; the
    schedule diffusers builds with ``rescale_betas_zero_snr=True``, which the exported folder says).
    """
    from jaxsd.sampling.schedule import rescale_zero_terminal_snr
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=np.float64) ** 2
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------
# State, optimiser, losses, steps.

@flax.struct.dataclass
class TrainState:
    step: jax.Array         # [] int32, steps taken
    params: Any             # the trained pytree: VAE params, or {"text": ..., "unet": ..., "head": ...}
    ema: Any                # the exponential moving average of params (what gets exported)
    opt_state: Any         # optax state of params
    key: jax.Array          # the run's PRNG key; step i uses fold_in(key, i)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup, then cosine decay to 10% of the peak; with ``cycle_steps``, the cosine
    restarts every ``cycle_steps`` steps from half the previous peak (no second warmup)."""
    cycle = cfg.cycle_steps or cfg.steps
    schedules = [optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.warmup_steps, max(cycle, cfg.warmup_steps + 1),
        end_value=0.1 * cfg.learning_rate)]
    for i in range(1, -(-cfg.steps // cycle)):
        peak = cfg.learning_rate * 0.5 ** i
        schedules.append(optax.cosine_decay_schedule(peak, cycle, alpha=0.1))
    return optax.join_schedules(schedules, [cycle * i for i in range(1, len(schedules))])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))


def vae_loss(vae: AutoencoderKL, params, images, weights, key, kl_weight: float):
    """images [B, H, W, 3] in [-1, 1], pixel weights [B, H, W] -> (loss, metrics).
    Kingma & Welling (2014), eq. 10, with a weighted L1:

        L1_w = sum_p w_p |x_p - x_hat_p| / sum_p w_p,    w = 1 + edge_weight * [p near the outline]

    Why the weights: a small triangle and a small circle differ in a few dozen pixels along the
    outline; the plain L1 is nearly as low for a blob as for the shape, and the autoencoder
    settled for blobs (71% of its reconstructions judged the right shape; 87% with the outline
    weighted, 99.8% together with the larger small size: docs/tiny_model.md).
    """
    posterior = vae.apply({"params": params}, images, method=vae.encode)
    z = posterior.sample(key)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    error = jnp.abs(recon - images).mean(axis=-1)                                  # [B, H, W]
    l1 = error.mean()
    weighted = (weights * error).sum() / weights.sum()
    # KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1 - log sigma^2) / 2, per latent element
    kl = 0.5 * (jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar).mean()
    return weighted + kl_weight * kl, {"l1": l1, "weighted_l1": weighted, "kl": kl}


# The caption attributes the text encoder's pooled output must predict (stage "unet"):
# foreground colour, background colour and shape, named in every caption, and size and
# position, each with one more class for "the caption does not say" (shapes.caption_attributes).
ATTRIBUTES = (("fg", len(COLOR_NAMES)), ("bg", len(COLOR_NAMES)), ("shape", len(SHAPES)),
              ("size", len(SIZE_NAMES) + 1), ("position", len(POSITION_NAMES) + 1))
ATTRIBUTE_HEAD = nn.Dense(sum(n for _, n in ATTRIBUTES))   # thrown away after training


def attribute_loss(pooled_BD, head_params, attributes_BA, has_caption_B):
    """Mean cross-entropy of a linear probe on the pooled text vector (the final state at EOS),
    over the captions that were not dropped; ``attributes_BA`` int [B, 5] as ATTRIBUTES.

    Why: trained by the denoising loss alone, the tiny text encoder collapsed. After 1,000 joint
    steps its output varied across captions by a std of 0.03 (0.39 at initialisation) and the
    UNet's predictions with a caption and with "" were the same to 0.5%: random context was noise
    to the young UNet, and the cheapest way to remove it was a constant text encoder. This loss
    keeps the colours and the shape readable in the text features from the first step, so that
    the UNet learns to use them instead.
    """
    logits_BK = ATTRIBUTE_HEAD.apply({"params": head_params}, pooled_BD)
    losses, start = [], 0
    for a, (_, n) in enumerate(ATTRIBUTES):
        logp_Bn = jax.nn.log_softmax(logits_BK[:, start:start + n])
        losses.append(-jnp.take_along_axis(logp_Bn, attributes_BA[:, a, None], axis=1)[:, 0])
        start += n
    per_caption_B = sum(losses) / len(losses)
    weight_B = has_caption_B.astype(jnp.float32)
    return (per_caption_B * weight_B).sum() / jnp.maximum(weight_B.sum(), 1.0)


def snr_weight(abar_B, prediction_type: str, gamma: float | None):
    """Min-SNR-gamma loss weights (Hang et al., 2023, eq. 10 and sec. 3.4), [B].

    With SNR_t = abar_t / (1 - abar_t), the weight on the squared error of x0 is min(SNR_t, gamma):
    the easy, nearly clean steps stop dominating the gradient. Written on the network's own
    target: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v. None: ones.
    """
    if gamma is None:
        return jnp.ones_like(abar_B)
    snr = abar_B / (1.0 - abar_B)
    return jnp.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


def diffusion_loss(text_model: CLIPTextModel, unet: UNet, params, latents, input_ids, attributes,
                   has_caption, key, alphas_cumprod, attribute_weight: float, noise_offset: float,
                   prediction_type: str = "epsilon", min_snr_gamma: float | None = None):
    """Denoising loss on scaled latents [B, h, w, C] with token ids [B, 77], plus
    ``attribute_weight`` times :func:`attribute_loss`.

    The UNet predicts the noise eps (Ho et al., 2020, eq. 14) or, with ``v_prediction``,
    v = sqrt(abar) eps - sqrt(1 - abar) z0 (Salimans & Ho, 2022, sec. 4), which stays a useful
    target where abar is 0; each squared error is weighted by :func:`snr_weight`.

    Offset noise (Guttenberg, 2023; diffusers' ``--noise_offset``): eps = N(0, I) plus a constant
    per image and channel, ~ N(0, noise_offset^2). SD's schedule ends at abar_999 = 0.0047, so the
    mean of z_t still shows the image's mean colour at every t (a 16 x 16 latent averages the
    noise down to std 1/16, against a signal of sqrt(0.0047) = 0.07): the UNet never needs the
    prompt for the background colour, and at sampling time takes it from the initial noise. The
    offset hides the mean colour at high t, where only the prompt can tell it. (A zero-terminal-
    SNR schedule removes the leak itself, for every frequency: Lin et al., 2024.)
    """
    B, C = latents.shape[0], latents.shape[-1]
    t_key, noise_key, offset_key = jax.random.split(key, 3)
    t_B = jax.random.randint(t_key, (B,), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(noise_key, latents.shape, latents.dtype)
    eps = eps + noise_offset * jax.random.normal(offset_key, (B, 1, 1, C), latents.dtype)
    abar = alphas_cumprod[t_B][:, None, None, None]
    noisy = jnp.sqrt(abar) * latents + jnp.sqrt(1.0 - abar) * eps         # Ho et al. (2020), eq. 4
    target = eps if prediction_type == "epsilon" else jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * latents
    text = text_model.apply({"params": params["text"]}, input_ids)
    prediction = unet.apply({"params": params["unet"]}, noisy, t_B, text.last_hidden_state)
    se_B = jnp.square(prediction.astype(jnp.float32) - target).mean(axis=(1, 2, 3))
    mse = se_B.mean()
    weighted = (snr_weight(abar[:, 0, 0, 0], prediction_type, min_snr_gamma) * se_B).mean()
    ce = attribute_loss(text.pooler_output, params["head"], attributes, has_caption)
    return weighted + attribute_weight * ce, {"mse": mse, "attribute_ce": ce}


def _update(state: TrainState, grads, optimizer, ema_decay):
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA warm-up (as diffusers' EMAModel): the average forgets the random initial weights within
    # the first few hundred steps instead of carrying ema_decay^steps of them to the end.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    return state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)


# The steps are jitted once per (model config, train config): both are frozen dataclasses, so
# they are hashable static arguments, and a second run with the same configs (a resumed run in the
# same process, a test) reuses the compiled step.

@partial(jax.jit, static_argnames=("model", "cfg"))
def vae_step(state: TrainState, images_uint8, weights, *, model: TinyModelConfig, cfg: TrainConfig):
    """One VAE step: (state, images uint8 [B, H, W, 3], pixel weights [B, H, W]) -> (state, metrics)."""
    vae = AutoencoderKL(model.vae)
    x = images_uint8.astype(jnp.float32) / 127.5 - 1.0                 # [0, 255] -> [-1, 1]
    key = jax.random.fold_in(state.key, state.step)
    (loss, metrics), grads = jax.value_and_grad(vae_loss, argnums=1, has_aux=True)(
        vae, state.params, x, weights, key, cfg.kl_weight)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return _update(state, grads, make_optimizer(cfg), cfg.ema_decay), metrics


@partial(jax.jit, static_argnames=("model", "cfg"))
def unet_step(state: TrainState, vae_params, pixels_or_moments, input_ids, attributes, has_caption, *,
              model: TinyModelConfig, cfg: TrainConfig):
    """One text encoder + UNet step on the frozen VAE's latents: (state, VAE params, images uint8
    [B, H, W, 3] or the VAE's posterior moments float32 [B, h, w, 2C] (mean, then log-variance,
    from ``loop.latent_pool``), input_ids [B, 77], attributes int [B, 5], has_caption bool [B])
    -> (state, metrics). Either way z ~ q(z|x) is drawn afresh at every step."""
    alphas_cumprod = jnp.asarray(scaled_linear_alphas_cumprod(
        zero_terminal_snr=cfg.zero_terminal_snr), jnp.float32)
    key = jax.random.fold_in(state.key, state.step)
    z_key, loss_key = jax.random.split(key)
    if pixels_or_moments.dtype == jnp.uint8:   # static: one compiled step per kind of input
        vae = AutoencoderKL(model.vae)
        x = pixels_or_moments.astype(jnp.float32) / 127.5 - 1.0
        posterior = vae.apply({"params": vae_params}, x, method=vae.encode)   # frozen: no gradient
    else:
        mean, logvar = jnp.split(pixels_or_moments, 2, axis=-1)
        posterior = DiagonalGaussian(mean, logvar)
    latents = jax.lax.stop_gradient(posterior.sample(z_key)) * model.vae.scaling_factor
    (loss, metrics), grads = jax.value_and_grad(diffusion_loss, argnums=2, has_aux=True)(
        CLIPTextModel(model.text), UNet(model.unet), state.params, latents, input_ids, attributes,
        has_caption, loss_key, alphas_cumprod, cfg.attribute_weight, cfg.noise_offset,
        cfg.prediction_type, cfg.min_snr_gamma)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return _update(state, grads, make_optimizer(cfg), cfg.ema_decay), metrics


def init_state(stage: str, model: TinyModelConfig, cfg: TrainConfig) -> TrainState:
    """Fresh parameters (see :func:`init_params`) and optimiser state for a stage."""
    _check_choice("stage", stage, STAGES)
    rng = np.random.default_rng([cfg.seed, STAGES.index(stage)])
    f = model.vae.downsample_factor
    if stage == "vae":
        params = init_params(AutoencoderKL(model.vae), rng, jnp.zeros((1, 64, 64, 3)))
    else:
        unet = UNet(model.unet)
        params = {"text": init_params(CLIPTextModel(model.text), rng,
                                      jnp.zeros((1, model.text.max_position_embeddings), jnp.int32)),
                  "unet": init_params(unet, rng, *unet.example_inputs(1, 64 // f)),
                  "head": init_params(ATTRIBUTE_HEAD, rng, jnp.zeros((1, model.text.hidden_size)))}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                      opt_state=make_optimizer(cfg).init(params),
                      key=jax.random.PRNGKey(cfg.seed))  # raw uint32[2]: checkpoints store it as is


def init_params(module, rng: np.random.Generator, *example_inputs) -> dict:
    """Random initial parameters, drawn on the host from the shapes of ``module.init``.

    flax's own ``init`` runs the forward pass, which XLA must compile (20-30 s on two CPU
    cores for the tiny UNet); the shapes alone come from tracing, for free. The scheme:
    kernels ~ truncated N(0, 1 / fan_in) (LeCun; flax's default), embeddings ~ N(0, 0.02^2)
    (GPT-2, CLIP), norm scales 1, biases 0.
    """
    shapes = convert.expected_shapes(module, *example_inputs)
    params = {}
    for path, shape in shapes.items():
        name = path.rsplit("/", 1)[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))        # Dense (in, out); Conv (kH, kW, in, out)
            # truncated to +-2 std; 0.8796 is the std of a standard normal truncated there
            w = np.clip(rng.standard_normal(shape), -2, 2) / 0.8796 / np.sqrt(fan_in)
        elif name in ("embedding", "position_embedding"):
            w = 0.02 * rng.standard_normal(shape)
        elif name == "scale":
            w = np.ones(shape)
        elif name == "bias":
            w = np.zeros(shape)
        else:
            raise ValueError(f"init_params: no rule for parameter {path!r} of shape {shape}; "
                             f"known names: kernel, embedding, position_embedding, scale, bias")
        params[path] = jnp.asarray(w, jnp.float32)
    return convert.unflatten(params)


def measure_scaling_factor(vae: AutoencoderKL, params, data: ShapesDataset, batches: int = 8,
                           batch_size: int = 64) -> float:
    """1 / std of the VAE's latent means over some batches (Rombach et al., 2022, sec. 4.3.2)."""
    encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode).mean)
    z = [np.asarray(encode(data.batch(10_000_000 + i, batch_size).images.astype(np.float32) / 127.5 - 1))
         for i in range(batches)]
    return float(1.0 / np.std(np.concatenate(z)))


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")

