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
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         rescale_betas_zero_snr=True),
    dict(trained_betas=list(np.linspace(1e-4, 0.02, 1000))),
])
def test_alphas_cumprod_match_diffusers(options):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**options).alphas_cumprod.double().numpy()
    ours = S.alphas_cumprod(ScheduleConfig.from_config(options))
    # diffusers multiplies 1000 float32 factors; ours is float64.
    np.testing.assert_allclose(ours, ref, rtol=3e-5, atol=1e-7)


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
    ("thresholding", True, "thresholding=True"),
    ("use_flow_sigmas", True, "use_flow_sigmas=True is not supported"),
    ("solver_order", 3, "solver_order=3 is not supported"),
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
    ("pndm", dict(skip_prk_steps=False), "skip_prk_steps=True"),
    ("euler", dict(interpolation_type="log_linear"), "interpolation_type='linear'"),
    ("ddpm", dict(variance_type="learned_range"), "variance_type='learned_range'"),
    ("dpmpp_2m", dict(solver_type="heun"), "solver_type='midpoint' only"),
    ("unipc", dict(solver_type="midpoint"), "solver_type='midpoint'"),
    ("lms", dict(clip_sample=True), "'lms'.*has no clip_sample"),
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
