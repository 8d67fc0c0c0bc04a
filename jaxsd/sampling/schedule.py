"""Noise schedules: betas, alphas_cumprod, timestep spacing and sigmas, in NumPy.

Everything here runs once on the host, outside `jit`, before sampling starts; the samplers in
`jaxsd/sampling/` turn these arrays into per-step constants (cast to float32 at the end). The
training-schedule arrays (betas, alphas_cumprod, training sigmas) are float32 like diffusers', so
that the small-t end, where float32 keeps few digits of 1 - alpha_bar, matches it; the arithmetic
on them after that is float64, within a few float32 ulps of diffusers' float32 arithmetic.

The semantics are those of diffusers' schedulers (v0.42), which read the checkpoint's
`scheduler_config.json` through `SchedulerClass.from_config(config)`: a key absent from the config
takes the *target* scheduler's default, which for some keys differs between schedulers
(`timestep_spacing` is "leading" for DDIM/DDPM/PNDM and "linspace" for the rest; `beta_start` and
`beta_end` are the DDPM paper's 0.0001 and 0.02 for most, but 0.00085 and 0.012 for Heun, KDPM2,
KDPM2Ancestral, DPMSolverSDE, LCM and TCD; `beta_schedule` is "linear" for all but LCM and TCD,
which default to "scaled_linear"). Those keys are `None` here and each sampler fills in its
diffusers default (`with_betas`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A checkpoint's scheduler config. Defaults are diffusers' (DDPM paper: linear 1e-4..0.02)."""

    num_train_timesteps: int = 1000  # T, the number of diffusion steps the UNet was trained on
    beta_start: float | None = None  # beta_1; None: the sampler's diffusers default (below); SD 0.00085
    beta_end: float | None = None  # beta_T; None: the sampler's diffusers default; SD 0.012
    beta_schedule: str | None = None  # None: the sampler's default ("linear"; LCM/TCD "scaled_linear")
    trained_betas: tuple[float, ...] | None = None  # explicit betas; overrides beta_schedule
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023, "Common diffusion noise schedules..." Alg. 1
    prediction_type: str = "epsilon"  # what the UNet predicts: epsilon, v_prediction (SD 2.x 768), sample
    timestep_spacing: str | None = None  # None: the sampler's diffusers default (leading or linspace)
    steps_offset: int = 0  # added to "leading" timesteps; SD sets 1
    clip_sample: bool | None = None  # clamp x0 (DDIM/DDPM default True, Heun False); SD sets False
    clip_sample_range: float = 1.0  # the clamp's bound
    set_alpha_to_one: bool | None = None  # DDIM/PNDM final alpha: 1, or alphas_cumprod[0]; SD sets False
    skip_prk_steps: bool | None = None  # PNDM: start with PLMS, no Runge-Kutta warmup; SD sets True
    variance_type: str | None = None  # DDPM posterior variance; default "fixed_small"
    use_karras_sigmas: bool = False  # Karras et al. 2022 eq. 5 sigmas (rho = 7)
    use_exponential_sigmas: bool = False  # sigmas uniform in log sigma
    use_beta_sigmas: bool = False  # Lee et al. 2024 beta(0.6, 0.6) sigmas
    sigma_min: float | None = None  # lower end of Karras/exponential/beta sigmas (None: training's)
    sigma_max: float | None = None  # upper end (None: the training schedule's largest sigma)
    final_sigmas_type: str | None = None  # last sigma: "zero" (default) or "sigma_min"
    interpolation_type: str = "linear"  # Euler: sigmas at timesteps by "linear" interp, or "log_linear"
    timestep_type: str = "discrete"  # Euler: "continuous" passes log(sigma) / 4 to a v-prediction model
    lower_order_final: bool | None = None  # multistep solvers: first order near the end (< 15 steps)
    euler_at_final: bool = False  # DPM-Solver multistep: always first order at the last step
    lambda_min_clipped: float = -math.inf  # DPM-Solver: clip the smallest log-SNR
    use_lu_lambdas: bool = False  # DPM-Solver multistep: Lu et al. 2022 uniform-lambda steps
    solver_type: str | None = None  # UniPC "bh1"/"bh2" (default bh2); DPM-Solver "midpoint" only;
    # another family's value becomes the sampler's default, as diffusers (see solver_type_for)
    solver_order: int | None = None  # multistep solvers' highest order (default 2); dpmpp_2m*: 1, 2, 3
    disable_corrector: tuple[int, ...] = ()  # UniPC: step indices that skip the corrector
    # Not config keys in diffusers but arguments of set_timesteps(timesteps=, sigmas=): an explicit
    # list replaces the spacing (e.g. Align Your Steps, `AYS`). num_steps must be its length
    # (timesteps) or its length - 1 (sigmas, which end with the final sigma, usually 0).
    timesteps: tuple[float, ...] | None = None  # descending, in [0, num_train_timesteps)
    sigmas: tuple[float, ...] | None = None  # descending Karras sigmas, N + 1 of them
    thresholding: bool = False  # Imagen dynamic thresholding of x0 (pixel-space models; not SD)
    dynamic_thresholding_ratio: float = 0.995  # the quantile of |x0| that sets the threshold s
    sample_max_value: float = 1.0  # the largest threshold s
    # Karras et al. 2022 Alg. 2's churn, arguments of diffusers' EulerDiscreteScheduler.step (not
    # config keys; its pipelines never pass them): euler only.
    s_churn: float = 0.0  # total churn; gamma = min(s_churn / N, sqrt(2) - 1) per step
    s_tmin: float = 0.0  # churn only where s_tmin <= sigma <= s_tmax
    s_tmax: float = math.inf
    s_noise: float = 1.0  # scale of the churn noise
    original_inference_steps: int = 50  # LCM/TCD: the distillation schedule's number of steps
    timestep_scaling: float = 10.0  # LCM: c_skip/c_out see t * timestep_scaling

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ScheduleConfig":
        """Reads a diffusers scheduler config dict with the semantics of `from_config`."""
        config = dict(config)
        # diffusers records which keys were filled with the old class's defaults and does not
        # carry them over to another scheduler class.
        for key in config.pop("_use_default_values", None) or ():
            config.pop(key, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in ("beta_start", "beta_end") and value is None:
                # None here means "the sampler's default"; a config that writes null is broken
                # (diffusers' torch.linspace fails on it).
                raise ValueError(f"scheduler config key {key}=None must be a number in (0, 1) "
                                 "(SD: 0.00085 and 0.012), or left out for the sampler's default")
            if key in fields:
                if isinstance(value, list):
                    value = tuple(value)
                kwargs[key] = value
            elif key.startswith("_"):
                continue  # bookkeeping: _class_name, _diffusers_version
            elif key == "algorithm_type":
                _check_choice("scheduler config key algorithm_type", value, ALGORITHM_TYPES)
            elif key in _HARMLESS_AT_DEFAULT:
                if value != _HARMLESS_AT_DEFAULT[key] and not (
                    isinstance(value, float) and math.isnan(value)):
                    raise ValueError(
                        f"scheduler config key {key}={value!r} is not supported by jaxsd "
                        f"(only {key}={_HARMLESS_AT_DEFAULT[key]!r})")
            else:
                raise ValueError(
                    f"unknown scheduler config key {key!r} (value {value!r}); known keys: "
                    f"{sorted(fields | set(_HARMLESS_AT_DEFAULT) | {'algorithm_type'})}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str) -> "ScheduleConfig":
        """Reads a checkpoint's `scheduler/scheduler_config.json`."""
        with open(path) as f:
            return cls.from_config(json.load(f))

    def validate(self) -> None:
        """Checks the values that every sampler uses; samplers check their own options."""
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= 1_000_000:
            raise ValueError(f"num_train_timesteps={T!r} must be an integer in [1, 1000000] (SD: 1000)")
        offset = self.steps_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < T:
            raise ValueError(f"steps_offset={offset!r} must be an integer in [0, num_train_timesteps={T}) "
                             f"(SD: 1)")
        if self.trained_betas is not None:
            betas = self.trained_betas
            if len(betas) != T:
                raise ValueError(f"trained_betas has {len(betas)} values; it needs num_train_timesteps={T}")
            if not all(_is_number(b) and 0 < b < 1 for b in betas):
                raise ValueError("trained_betas must all be finite numbers in (0, 1)")
        else:
            for name in ("beta_start", "beta_end"):
                value = getattr(self, name)
                if value is not None and not (_is_number(value) and 0 < value < 1):
                    raise ValueError(f"{name}={value!r} must be a number in (0, 1) (SD: 0.00085 and 0.012)")
            if None not in (self.beta_start, self.beta_end) and self.beta_start > self.beta_end:
                raise ValueError(f"beta_start={self.beta_start} must not exceed beta_end={self.beta_end}")
        if self.beta_schedule is not None:
            _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if sum([self.use_karras_sigmas, self.use_exponential_sigmas, self.use_beta_sigmas]) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, "
                             "use_beta_sigmas may be True")
        if self.solver_order is not None and (isinstance(self.solver_order, bool) or
                                              self.solver_order not in (1, 2, 3)):
            raise ValueError(f"solver_order={self.solver_order!r} must be 1, 2 or 3 (diffusers' "
                             "multistep solvers; dpmpp_2m, dpmpp_2m_sde, unipc and deis take 1 and 3)")
        if self.timesteps is not None and self.sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both (diffusers' set_timesteps takes one)")
        if self.timesteps is not None:
            t = self.timesteps
            if not t or not all(_is_number(v) and 0 <= v < T for v in t) or any(
                    a <= b for a, b in zip(t, t[1:])):
                raise ValueError(f"timesteps={list(t)!r} must be a non-empty, strictly descending list "
                                 f"of numbers in [0, num_train_timesteps={T})")
        if self.sigmas is not None:
            s = self.sigmas
            if len(s) < 2 or not all(_is_number(v) and v >= 0 for v in s) or any(
                    a <= b for a, b in zip(s, s[1:])):
                raise ValueError(f"sigmas={list(s)!r} must be a strictly descending list of at least "
                                 "two non-negative numbers (N + 1 for N steps, usually ending with 0)")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number, or None for the "
                                 "training schedule's own")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min={self.sigma_min!r} must be below sigma_max={self.sigma_max!r}")
        if not (_is_number(self.dynamic_thresholding_ratio) and 0 < self.dynamic_thresholding_ratio <= 1):
            raise ValueError(f"dynamic_thresholding_ratio={self.dynamic_thresholding_ratio!r} must be a "
                             "number in (0, 1] (diffusers: 0.995)")
        if not (_is_number(self.sample_max_value) and self.sample_max_value > 0):
            raise ValueError(f"sample_max_value={self.sample_max_value!r} must be a positive number")
        for name in ("s_churn", "s_noise", "s_tmin"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if not (isinstance(self.s_tmax, (int, float)) and not isinstance(self.s_tmax, bool)
                and self.s_tmax >= self.s_tmin):
            raise ValueError(f"s_tmax={self.s_tmax!r} must be a number >= s_tmin={self.s_tmin!r} "
                             "(inf: no upper bound)")
        n = self.original_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T:
            raise ValueError(f"original_inference_steps={n!r} must be an integer in [1, "
                             f"num_train_timesteps={T}] (LCM/TCD: 50)")
        if not (_is_number(self.timestep_scaling) and self.timestep_scaling > 0):
            raise ValueError(f"timestep_scaling={self.timestep_scaling!r} must be a positive number "
                             "(LCM: 10.0)")


# Keys that other diffusers schedulers write into their configs. They change nothing while they
# hold these values; any other value asks for a feature jaxsd does not have, so it raises.
_HARMLESS_AT_DEFAULT = {
    "predict_x0": True,
    "solver_p": None, "use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
    "time_shift_type": "exponential", "shift_terminal": None, "noise_sampler_seed": None,
}

# DPMSolverMultistep/Singlestep and DEIS write algorithm_type into their configs. In jaxsd the
# sampler's name chooses the algorithm (dpmpp_2m and dpmpp_2s are DPM-Solver++, dpmpp_2m_sde its
# SDE form, deis DEIS), so the key only tells `default_sampler` which sampler the checkpoint's own
# scheduler was; these are the values diffusers has.
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "deis", "dpmsolver", "sde-dpmsolver")


# The solver families' solver_type values (diffusers' __init__): DPMSolverMultistep/Singlestep
# run midpoint or heun, UniPC bh1 or bh2, DEIS logrho. A config saved by one family and read by
# another carries the other's value, which diffusers replaces by the reading class's default.
SOLVER_TYPES = {"dpm": ("midpoint", "heun"), "unipc": ("bh2", "bh1"), "deis": ("logrho",)}


def solver_type_for(cfg: ScheduleConfig, family: str) -> str:
    """The solver_type a sampler of `family` ("dpm", "unipc", "deis") runs with this config."""
    own = SOLVER_TYPES[family]
    value = cfg.solver_type
    if value is None or (value not in own and any(value in other for other in SOLVER_TYPES.values())):
        return own[0]  # unset, or another family's: this family's default
    _check_choice("solver_type", value, own)
    return value


# diffusers' defaults for beta_start / beta_end / beta_schedule, by scheduler class: the DDPM
# paper's linear 1e-4..0.02, except for the classes ported from k-diffusion ("sensible defaults",
# SD's values on a linear schedule) and LCM/TCD (SD's own scaled_linear schedule).
DDPM_BETAS = (0.0001, 0.02, "linear")
SD_BETAS = (0.00085, 0.012, "linear")
LCM_BETAS = (0.00085, 0.012, "scaled_linear")


def with_betas(cfg: ScheduleConfig, default: tuple[float, float, str] = DDPM_BETAS) -> ScheduleConfig:
    """`cfg` with the beta_start / beta_end / beta_schedule it left out set to the sampler's default."""
    if None not in (cfg.beta_start, cfg.beta_end, cfg.beta_schedule):
        return cfg
    pick = lambda value, fallback: fallback if value is None else value
    out = dataclasses.replace(cfg, beta_start=pick(cfg.beta_start, default[0]),
                              beta_end=pick(cfg.beta_end, default[1]),
                              beta_schedule=pick(cfg.beta_schedule, default[2]))
    out.validate()
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


# --- betas and alphas --------------------------------------------------------------------------


def betas(cfg: ScheduleConfig) -> np.ndarray:
    """beta_t for t = 0..T-1 [T] (Ho et al. 2020 sec. 4; Nichol & Dhariwal 2021 eq. 17).

    float32 values, as diffusers builds them (`torch.linspace(..., dtype=torch.float32)`), held in
    a float64 array. torch.linspace rounds some values one ulp differently from NumPy's (how
    depends on the CPU's vector width); 1 - beta_t absorbs almost all of that (see alphas_cumprod).
    """
    T = cfg.num_train_timesteps
    cfg = with_betas(cfg)  # a sampler fills in its own default first; DDPM's otherwise
    if cfg.trained_betas is not None:
        b = np.asarray(cfg.trained_betas, np.float64).astype(np.float32)
    elif cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, T).astype(np.float32)
    elif cfg.beta_schedule == "scaled_linear":
        # Stable Diffusion: linear in sqrt(beta), then squared (in float32, as diffusers).
        b = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2: diffusers computes it in Python floats, then casts to float32
        # Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008,
        # beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999).
        alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                     np.float32)
    if cfg.rescale_betas_zero_snr:
        b = rescale_zero_terminal_snr(b)
    return b.astype(np.float64)


def _cumprod32(alphas: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 vector: the running product is kept in float64, each output
    rounded to float32 (ATen accumulates in the "acc type"; checked bit for bit by the tests)."""
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 Alg. 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0.

    Float32 throughout, operation for operation as diffusers' `rescale_zero_terminal_snr`.
    """
    f32 = np.float32
    sqrt_ab = np.sqrt(_cumprod32(f32(1) - b.astype(f32)))
    sqrt_ab_0, sqrt_ab_T = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - sqrt_ab_T) * (sqrt_ab_0 / (sqrt_ab_0 - sqrt_ab_T))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return f32(1) - alphas


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) [T]: float32 values (diffusers'), in a float64 array.

    Computed as diffusers does: 1 - beta_t in float32, the product accumulated in float64 and
    rounded to float32 (torch.cumprod). Near t = 0, 1 - alpha_bar_t ~ beta_0 keeps only ~4
    significant digits in float32; the sigmas built from it inherit that, in diffusers and here
    alike. Against diffusers: 1 - alpha_bar_t agrees within 2e-7 relative (tests).
    """
    return _cumprod32(np.float32(1) - betas(cfg).astype(np.float32)).astype(np.float64)


def train_sigmas(cfg: ScheduleConfig) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t).

    In float32 from the float32 alpha_bar, as diffusers' sigma-based schedulers compute it. With
    zero terminal SNR alpha_bar_T = 0 and sigma_T = inf; diffusers replaces alpha_bar_T by 2**-24
    (a float32 epsilon), and so do we.
    """
    ab = alphas_cumprod(cfg).astype(np.float32)
    if cfg.rescale_betas_zero_snr:
        ab[-1] = 2.0**-24
    return (((np.float32(1) - ab) / ab) ** np.float32(0.5)).astype(np.float64)


# --- timesteps ---------------------------------------------------------------------------------


def spaced_timesteps(spacing: str, num_steps: int, num_train: int, steps_offset: int = 0,
                     *, integer: bool = True) -> np.ndarray:
    """The N timesteps the sampler visits, descending (Lin et al. 2023 Table 2 for the spacings).

    leading:  t_i = i * (T // N) + steps_offset      (SD 1.x/2.x: T=1000, offset 1 -> 981, ..., 1)
    trailing: t_i = round(T - i * T / N) - 1         (always starts at T - 1)
    linspace: t_i = linspace(0, T - 1, N)             (fractional unless `integer`)
    """
    if spacing == "linspace":
        t = np.linspace(0, num_train - 1, num_steps)[::-1]
        return t.round().astype(np.int64) if integer else t.astype(np.float32).astype(np.float64)
    if spacing == "leading":
        t = (np.arange(num_steps) * (num_train // num_steps))[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
    else:
        _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    return t.astype(np.int64) if integer else t.astype(np.float64)


def interp_sigmas(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps, linear interpolation between training sigmas."""
    return np.interp(timesteps, np.arange(len(sigmas_train)), sigmas_train)


def sigma_to_t(sigma: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """The fractional timestep whose sigma is `sigma`, by linear interpolation in log sigma.

    This is how Karras-style schedules tell the UNet (trained on integer t) where it is; the same
    as diffusers' `_sigma_to_t` and k-diffusion's `DiscreteSchedule.sigma_to_t`.
    """
    log_sigmas = np.log(sigmas_train)
    log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
    dists = log_sigma[None] - log_sigmas[:, None]  # [T, N]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


# --- sigma schedules ---------------------------------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """sigmas evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Lee et al. 2024 ("Beta sampling is all you need"): sigmas at Beta(a, b) quantiles."""
    import scipy.stats

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return sigma_min + ppf * (sigma_max - sigma_min)


def convert_sigmas(cfg: ScheduleConfig, sigmas: np.ndarray, n: int, *,
                   karras_config_range: bool = True) -> np.ndarray | None:
    """Karras / exponential / beta sigmas spanning `sigmas` (descending), or None if none is asked.

    The span is the config's sigma_min / sigma_max where it gives them: diffusers' conversions
    read them from any scheduler config that has the keys (`hasattr(self.config, "sigma_min")`),
    declared or not, except the Karras conversion of LMSDiscrete and DPMSolverSDE, which always
    spans the training sigmas (`karras_config_range=False` there).
    """
    config_range = karras_config_range or not cfg.use_karras_sigmas
    lo = cfg.sigma_min if config_range and cfg.sigma_min is not None else float(sigmas[-1])
    hi = cfg.sigma_max if config_range and cfg.sigma_max is not None else float(sigmas[0])
    if cfg.use_karras_sigmas:
        return karras_sigmas(lo, hi, n)
    if cfg.use_exponential_sigmas:
        return exponential_sigmas(lo, hi, n)
    if cfg.use_beta_sigmas:
        return beta_sigmas(lo, hi, n)
    return None


def custom_sigmas(cfg: ScheduleConfig) -> bool:
    """Whether the config asks for Karras, exponential or beta sigmas."""
    return cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas


# --- Align Your Steps (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules in
# Diffusion Models", arXiv 2404.14507): 10-step schedules optimised per model family, as NVIDIA
# published them (the same numbers as diffusers' AysSchedules). Use with num_steps=10:
#   dataclasses.replace(cfg, timesteps=AYS["sd1"]["timesteps"])   or   sigmas=AYS["sd1"]["sigmas"]

AYS = {
    "sd1": {"timesteps": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
            "sigmas": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0)},
    "sdxl": {"timesteps": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
             "sigmas": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0)},
}


# --- Schedules by name, as other UIs (AUTOMATIC1111, ComfyUI) offer them --------------------

SCHEDULE_NAMES = ("default", "karras", "exponential", "beta", "ays", "ays_sdxl", "sgm_uniform", "simple")


def named_schedule(cfg: ScheduleConfig, name: str, num_steps: int) -> ScheduleConfig:
    """`cfg` with the step schedule `name` (T = num_train_timesteps, N = num_steps):

    default      the sampler's own spacing (`timestep_spacing`), unchanged
    karras       use_karras_sigmas: Karras et al. 2022 eq. 5, rho = 7 (diffusers' flag)
    exponential  use_exponential_sigmas: N sigmas evenly spaced in log sigma (diffusers' flag)
    beta         use_beta_sigmas: Beta(0.6, 0.6) quantiles (Lee et al. 2024; diffusers' flag)
    ays          Align Your Steps for SD 1.x, `AYS["sd1"]["timesteps"]` (N must be 10)
    ays_sdxl     the same for SDXL, `AYS["sdxl"]["timesteps"]`
    sgm_uniform  timesteps = round(linspace(T - 1, 0, N + 1))[:N]: uniform in t from the top,
                 the last step ending above 0 (ComfyUI's sgm_uniform, in integer timesteps)
    simple       timesteps = T - 1 - floor(i T / N), i = 0..N-1 (ComfyUI's simple)

    The flags run with the samplers whose diffusers class has them; the lists are explicit
    `timesteps`, for the samplers that take one (euler, heun, ddpm, dpmpp_2m, dpmpp_2m_sde,
    dpmpp_2s, lcm, tcd). A sampler refuses what its diffusers class cannot do, as always.
    """
    _check_choice("schedule", name, SCHEDULE_NAMES)
    T = cfg.num_train_timesteps
    flags = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
    if name == "default":
        return cfg
    if name in flags:
        return dataclasses.replace(cfg, **{flags[name]: True})
    if name.startswith("ays"):
        if num_steps != 10:
            raise ValueError(f"schedule={name!r} is Align Your Steps' 10-step schedule; got num_steps={num_steps}")
        return dataclasses.replace(cfg, timesteps=AYS["sdxl" if name == "ays_sdxl" else "sd1"]["timesteps"])
    if name == "sgm_uniform":
        t = np.round(np.linspace(T - 1, 0, num_steps + 1))[:num_steps]
    else:  # simple
        t = T - 1 - np.floor(np.arange(num_steps) * T / num_steps)
    out = dataclasses.replace(cfg, timesteps=tuple(int(v) for v in t))
    out.validate()  # N > T would repeat timesteps
    return out


def explicit_steps(cfg: ScheduleConfig) -> int | None:
    """The number of steps an explicit `timesteps` / `sigmas` list makes, or None."""
    if cfg.timesteps is not None:
        return len(cfg.timesteps)
    if cfg.sigmas is not None:
        return len(cfg.sigmas) - 1
    return None


# --- SD presets (as in the checkpoints' scheduler_config.json) ---------------------------------

SD1_CONFIG = ScheduleConfig(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
    clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
SD2_V_CONFIG = dataclasses.replace(SD1_CONFIG, prediction_type="v_prediction")
