"""Schedules and configs against diffusers, and the errors bad input must raise."""
import dataclasses
import json

import numpy as np
import pytest
import jax.numpy as jnp

from sampler_reference import CONFIGS, jax_model
from jaxsd import sampling
from jaxsd.sampling import schedule as S
from jaxsd.sampling.schedule import ScheduleConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("options", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="linear"),
    dict(beta_schedule="linear", num_train_timesteps=1100),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
])
def test_schedule_matches_diffusers_float32(options):
    """alpha_bar and the training sigmas are diffusers' float32 values, to a few float32 ulps.

    The test that matters is at small t, where 1 - alpha_bar_t ~ beta_0 keeps ~4 digits in
    float32: the float64 schedule jaxsd used before differed there by 1e-5 (SD) to 2.6e-4
    (squaredcos_cap_v2). What is left is torch.linspace rounding some betas one ulp differently.
    """
    from diffusers import DDIMScheduler

    ref_ab = DDIMScheduler(**options).alphas_cumprod
    ref_sigma = (((1 - ref_ab) / ref_ab) ** 0.5).double().numpy()
    ref_ab = ref_ab.double().numpy()
    cfg = ScheduleConfig.from_config(options)
    ab, sigma = S.alphas_cumprod(cfg), S.train_sigmas(cfg)
    assert ab.dtype == np.float64 and np.array_equal(ab, ab.astype(np.float32))  # float32 values
    np.testing.assert_allclose(1 - ab, 1 - ref_ab, rtol=4e-7, atol=0)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=4e-7, atol=0)
    np.testing.assert_allclose(sigma[:10], ref_sigma[:10], rtol=2e-7, atol=0)


def test_cumprod_is_torch_bit_for_bit():
    """torch.cumprod of float32 keeps the running product in float64: so does _cumprod32."""
    import torch

    alphas = 1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    np.testing.assert_array_equal(S._cumprod32(alphas.numpy()), torch.cumprod(alphas, 0).numpy())


def test_zero_terminal_snr_schedule_matches_diffusers():
    """Lin et al.'s rescaling subtracts sqrt(alpha_bar_T) and squares again, so one float32 ulp of
    sqrt(alpha_bar) becomes ~1e-5 of 1 - alpha_bar near t = 0. torch's float32 sqrt is not
    correctly rounded on every CPU (on AVX-512 it is off by one ulp for ~18% of the values, NumPy's
    is exact), so diffusers' own result moves by that much between machines: that is the bound."""
    from diffusers import DDIMScheduler

    options = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                   rescale_betas_zero_snr=True)
    ref_ab = DDIMScheduler(**options).alphas_cumprod.double().numpy()
    ab = S.alphas_cumprod(ScheduleConfig.from_config(options))
    assert ab[-1] == 0 and ref_ab[-1] == 0
    np.testing.assert_allclose(ab[:-1], ref_ab[:-1], rtol=5e-5, atol=0)
    np.testing.assert_allclose(1 - ab, 1 - ref_ab, rtol=3e-5, atol=0)


def test_from_config_reads_sd_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(CONFIGS["sd1"]))
    cfg = ScheduleConfig.from_file(str(path))
    assert cfg == S.SD1_CONFIG
    assert cfg.timestep_spacing is None  # each sampler applies its own diffusers default
    np.testing.assert_array_equal(sampling.make_plan("ddim", 50, cfg).timesteps[:3], [981, 961, 941])
    np.testing.assert_allclose(sampling.make_plan("euler", 50, cfg).timesteps[:2], [999, 978.6122],
                               rtol=1e-6)


def test_from_config_drops_use_default_values():
    """diffusers does not carry keys that only held the old class's defaults."""
    raw = dict(CONFIGS["sd1"], timestep_spacing="leading", _use_default_values=["timestep_spacing"])
    assert ScheduleConfig.from_config(raw).timestep_spacing is None


@pytest.mark.parametrize("key,value,match", [
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid'.*choose one of"),
    ("prediction_type", "flow_prediction", "prediction_type='flow_prediction'.*choose one of"),
    ("timestep_spacing", "middle", "timestep_spacing='middle'"),
    ("beta_end", None, "beta_end=None must be a number in"),
    ("dynamic_thresholding_ratio", 1.5, "dynamic_thresholding_ratio=1.5 must be a number in"),
    ("sample_max_value", -1, "sample_max_value=-1 must be a positive number"),
    ("use_flow_sigmas", True, "use_flow_sigmas=True is not supported"),
    ("solver_order", 4, r"solver_order=4 must be 1, 2 or 3"),
    ("my_new_option", 1, "unknown scheduler config key 'my_new_option'"),
])
def test_bad_config_raises(key, value, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig.from_config(dict(CONFIGS["sd1"], **{key: value}))


def test_unknown_sampler_lists_names():
    with pytest.raises(ValueError, match="unknown sampler='euler_ancestral'.*'ddim'.*'unipc'"):
        sampling.sample(jax_model, jnp.zeros((1, 2, 2, 4)), sampler="euler_ancestral",
                        num_steps=5, schedule=S.SD1_CONFIG)


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 2.5])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match=r"num_steps=.* must be an integer in \[1, 1000\]"):
        sampling.make_plan("euler", num_steps, S.SD1_CONFIG)


@pytest.mark.parametrize("name,options,match", [
    ("pndm", dict(prediction_type="sample"), "'pndm'.*prediction_type='sample'"),
    ("euler_a", dict(prediction_type="sample"), "'euler_a'.*prediction_type='sample'"),
    ("dpm2", dict(prediction_type="sample"), "'dpm2'.*prediction_type='sample'"),
    ("euler_a", dict(use_karras_sigmas=True), "'euler_a'.*has no use_karras_sigmas"),
    ("ddim", dict(use_karras_sigmas=True), "'ddim'.*has no use_karras_sigmas"),
    ("heun", dict(rescale_betas_zero_snr=True), "'heun'.*has no rescale_betas_zero_snr"),
    ("euler", dict(interpolation_type="cubic"), r"interpolation_type='cubic'.*\['linear', 'log_linear'\]"),
    ("euler", dict(timestep_type="edm"), r"timestep_type='edm'.*\['discrete', 'continuous'\]"),
    ("heun", dict(thresholding=True), "'heun'.*has no thresholding"),
    ("ddpm", dict(variance_type="fixed_large_log"), "variance_type='fixed_large_log'"),
    ("dpmpp_2m", dict(solver_type="heun"), "solver_type='midpoint' only"),
    ("unipc", dict(solver_type="bh3"), r"solver_type='bh3'.*\['bh2', 'bh1'\]"),
    ("deis", dict(solver_type="bh3"), r"solver_type='bh3'.*\['logrho'\]"),
    ("dpmpp_2s", dict(solver_type="bh3"), r"solver_type='bh3'.*\['midpoint', 'heun'\]"),
    ("lms", dict(clip_sample=True), "'lms'.*has no clip_sample"),
    ("euler", dict(solver_order=3), r"'euler'.*has no solver_order \(got solver_order=3.*dpmpp_2m, dpmpp_2m_sde, dpmpp_2s, unipc, deis"),
    ("lcm", dict(solver_order=1), r"'lcm'.*has no solver_order"),
])
def test_unsupported_sampler_option_raises(name, options, match):
    cfg = dataclasses.replace(S.SD1_CONFIG, **options)
    with pytest.raises(ValueError, match=match):
        sampling.make_plan(name, 10, cfg)


def test_karras_sigmas_formula():
    """Karras et al. 2022 eq. 5 endpoints and rho."""
    s = S.karras_sigmas(0.03, 14.6, 5)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    np.testing.assert_allclose(np.diff(s ** (1 / 7)), np.diff(s ** (1 / 7))[0])


def test_sigma_to_t_inverts_interp():
    sig = S.train_sigmas(S.SD1_CONFIG)
    t = np.array([0.0, 17.25, 500.5, 999.0])
    back = S.sigma_to_t(S.interp_sigmas(t, sig), sig)
    np.testing.assert_allclose(back[[0, 3]], t[[0, 3]], atol=1e-9)  # integer t: exact
    # between integers: interp is linear in sigma, sigma_to_t linear in log sigma
    np.testing.assert_allclose(back, t, atol=5e-3)


def test_diffusers_default_spacing_per_sampler():
    """Absent timestep_spacing: leading for DDIM/DDPM/PNDM, linspace for the rest (as diffusers)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    cfg = dict(CONFIGS["sd1"])
    for name, cls in [("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)]:
        ref = cls.from_config(cfg)
        ref.set_timesteps(10)
        plan = sampling.make_plan(name, 10, ScheduleConfig.from_config(cfg))
        np.testing.assert_allclose(plan.timesteps, ref.timesteps.numpy(), rtol=1e-6)
        assert float(plan.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-5)


def test_named_schedules():
    """Schedules by name (docs/samplers.md gives each formula)."""
    from jaxsd.sampling.schedule import named_schedule

    cfg = ScheduleConfig.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    assert named_schedule(cfg, "default", 7) == cfg
    assert named_schedule(cfg, "karras", 7).use_karras_sigmas
    assert named_schedule(cfg, "beta", 7).use_beta_sigmas
    assert named_schedule(cfg, "ays", 10).timesteps == S.AYS["sd1"]["timesteps"]
    assert named_schedule(cfg, "ays_sdxl", 10).timesteps == S.AYS["sdxl"]["timesteps"]
    # sgm_uniform: uniform in t from T - 1 down to 0, N + 1 points, the last (0) dropped
    assert named_schedule(cfg, "sgm_uniform", 4).timesteps == (999, 749, 500, 250)
    # simple: T - 1 - floor(i T / N)
    assert named_schedule(cfg, "simple", 3).timesteps == (999, 666, 333)
    assert named_schedule(cfg, "simple", 4).timesteps == (999, 749, 499, 249)
    with pytest.raises(ValueError, match=r"schedule='ays' is Align Your Steps' 10-step schedule; got num_steps=7"):
        named_schedule(cfg, "ays", 7)
    with pytest.raises(ValueError, match=r"schedule='uniform' is not supported; choose one of \['default', 'karras'"):
        named_schedule(cfg, "uniform", 7)
    # they run where the sampler takes an explicit list, and are refused (naming those) elsewhere
    sampling.make_plan("dpmpp_2m", 5, named_schedule(cfg, "sgm_uniform", 5))
    with pytest.raises(ValueError, match="takes no explicit timesteps list"):
        sampling.make_plan("unipc", 5, named_schedule(cfg, "simple", 5))
