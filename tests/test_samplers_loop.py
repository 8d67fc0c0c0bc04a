"""The sampling loop: scan == Python loop, compiled once, img2img, progress, bfloat16 models."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from sampler_reference import CONFIGS, DIFFUSERS, _scheduler_class, jax_model
from jaxsd.sampling import loop as sampling
from jaxsd.sampling.schedule import SD1_CONFIG, ScheduleConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LATENTS = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
KEY = jax.random.key(3)


def python_loop(name, num_steps, cfg, latents, key, eta=0.0):
    """The same step functions driven by a Python for loop, one jitted step at a time."""
    s = sampling.get_sampler(name)
    plan = sampling.make_plan(name, num_steps, cfg)
    step = jax.jit(s.step)
    state = s.init(jnp.asarray(latents) * plan.init_noise_sigma)
    for i in range(len(plan.timesteps)):
        c = {k: v[i] for k, v in plan.consts.items()}
        c["eta"] = jnp.float32(eta)
        out = jax_model(plan.c_in[i] * state.x, plan.timesteps[i])
        noise = sampling.step_noise(key, i, state.x.shape) if s.stochastic else None
        state = step(state, out, c, noise)
    return np.asarray(state.x)


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_scan_equals_python_loop(name):
    cfg = ScheduleConfig.from_config(CONFIGS["sd1"])
    eta = 0.5 if name in ("ddim", "tcd") else 0.0   # only DDIM has an eta (TCD: its gamma)
    scanned = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=7,
                              schedule=cfg, key=KEY, eta=eta).latents
    looped = python_loop(name, 7, cfg, LATENTS, KEY, eta=eta)
    np.testing.assert_allclose(scanned, looped, rtol=1e-6, atol=1e-6)


def test_pndm_runge_kutta_scan_equals_python_loop():
    cfg = ScheduleConfig.from_config(dict(CONFIGS["sd1"], skip_prk_steps=False))
    scanned = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="pndm", num_steps=7,
                              schedule=cfg, key=KEY).latents
    np.testing.assert_allclose(scanned, python_loop("pndm", 7, cfg, LATENTS, KEY), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["euler", "pndm", "dpmpp_2m", "lcm", "tcd"])
def test_schedules_share_one_program(name):
    """Betas, training length, spacing and sigma schedules are numbers: one compiled program."""
    configs = [dict(CONFIGS["linear_1100"], skip_prk_steps=True),
               dict(CONFIGS["cosine"], skip_prk_steps=True), CONFIGS["trailing"], CONFIGS["sd2_v"]]
    if name not in ("pndm", "lcm", "tcd"):
        configs.append(CONFIGS["karras"])
    if name in ("lcm", "tcd"):
        # LCM/TCD ignore timestep_spacing (as diffusers' do); TCD's alpha_bar table has the
        # training length T as its shape, so a different T is a different program there.
        configs.remove(CONFIGS["trailing"])
        if name == "tcd":
            configs = configs[1:]  # the 1100-step schedule
    run = lambda raw: sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=6,
                                      schedule=ScheduleConfig.from_config(raw), key=KEY).latents
    first = run(CONFIGS["sd1"])
    size = sampling._sample_jit._cache_size()
    outs = [run(raw) for raw in configs]
    assert sampling._sample_jit._cache_size() == size
    assert all(not np.allclose(first, out) for out in outs)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2s", "unipc", "deis"])
def test_solver_orders_share_one_program(name):
    """solver_order 1, 2 and 3 are numbers in the plan (the step picks its order at run time)."""
    run = lambda order: sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=6,
                                        schedule=ScheduleConfig.from_config(dict(CONFIGS["sd1"], solver_order=order)),
                                        key=KEY).latents
    outs = [run(2)]
    size = sampling._sample_jit._cache_size()
    outs += [run(1), run(3)]
    assert sampling._sample_jit._cache_size() == size
    assert all(not np.allclose(a, b) for a, b in zip(outs, outs[1:]))


def test_tcd_gamma_is_traced():
    """TCD's gamma (eta) picks the timestep s it steps to; still one program for every gamma."""
    run = lambda eta: sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="tcd", num_steps=4,
                                      schedule=SD1_CONFIG, key=KEY, eta=eta).latents
    outs = [run(0.0)]
    size = sampling._sample_jit._cache_size()
    outs += [run(eta) for eta in (0.3, 0.7, 1.0)]
    assert sampling._sample_jit._cache_size() == size
    assert all(not np.allclose(a, b) for a, b in zip(outs, outs[1:]))


def test_explicit_lists_of_one_length_share_one_program():
    """Explicit timesteps are numbers like any schedule: same length, same program."""
    run = lambda t: sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="euler", num_steps=4,
                                    schedule=ScheduleConfig.from_config(dict(CONFIGS["sd1"], timesteps=t)),
                                    key=KEY).latents
    first = run([999, 700, 400, 100])
    size = sampling._sample_jit._cache_size()
    second = run([950, 600, 300, 50])
    assert sampling._sample_jit._cache_size() == size and not np.allclose(first, second)


def test_pndm_runge_kutta_refuses_img2img():
    cfg = ScheduleConfig.from_config(dict(CONFIGS["sd1"], skip_prk_steps=False))
    with pytest.raises(ValueError, match=r"'pndm' with skip_prk_steps=False.*first_step=3"):
        sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="pndm", num_steps=7, schedule=cfg,
                        init_latents=jnp.asarray(LATENTS), first_step=3)


def guided_model(x, t, cond, scale):
    """Classifier-free guidance over a fake model, with traced extra arguments."""
    uncond = jax_model(x, t)
    return uncond + scale * (jax_model(x + cond, t) - uncond)


def test_traced_arguments_do_not_recompile():
    """Guidance scale, eta, key, the schedule's numbers and img2img's first step are traced."""
    cond = jnp.full(LATENTS.shape, 0.1)
    run = lambda **kw: sampling.sample(
        guided_model, jnp.asarray(LATENTS), sampler="ddim",
        **{"num_steps": 5, "schedule": SD1_CONFIG, "model_args": (cond, jnp.float32(7.5)),
           **kw}).latents
    run(eta=0.0)
    size = sampling._sample_jit._cache_size()
    a = run(eta=0.0, model_args=(cond, jnp.float32(3.0)))
    b = run(eta=1.0, key=jax.random.key(7))
    c = run(schedule=ScheduleConfig.from_config(CONFIGS["sd2_v"]))
    d = run(init_latents=jnp.asarray(LATENTS), first_step=1)
    e = run(init_latents=jnp.asarray(LATENTS), first_step=3)
    assert sampling._sample_jit._cache_size() == size + 1  # only img2img added a program
    assert not np.allclose(a, b) and not np.allclose(a, c) and not np.allclose(d, e)
    run(num_steps=6)  # a new number of steps is a new program
    assert sampling._sample_jit._cache_size() == size + 2


class Counter:
    """A stand-in progress bar: counts updates, records the phase shown."""

    def __init__(self):
        self.n, self.postfixes, self.resets = 0, [], 0

    def update(self, k):
        self.n += k

    def set_postfix_str(self, text):
        self.postfixes.append(text)

    def reset(self, total=None):
        self.n, self.resets = 0, self.resets + 1


def test_trajectory_and_progress():
    bar = Counter()
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="heun", num_steps=4,
                          schedule=SD1_CONFIG, return_trajectory=True, progress=bar)
    assert out.trajectory.shape == (7,) + LATENTS.shape  # 2N - 1 evaluations
    assert bar.n == 7 and bar.postfixes == ["compiling...", ""] and bar.resets == 1
    np.testing.assert_array_equal(out.latents, out.trajectory[-1])


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_progress_runs_the_scan_s_steps(name):
    """With a progress bar the loop runs one compiled evaluation per call (so that the programs
    can go to JAX's persistent cache): the same steps, noise and img2img skip as the scan, equal
    to float32 rounding (1e-6 of the latents' scale, about 1), trajectories included."""
    cfg = ScheduleConfig.from_config(dict(CONFIGS["sd1"], skip_prk_steps=True))
    eta = 0.5 if name in ("ddim", "tcd") else 0.0
    kw = dict(sampler=name, num_steps=5, schedule=cfg, key=KEY, eta=eta, return_trajectory=True)
    for extra in ({}, dict(init_latents=jnp.asarray(LATENTS[..., ::-1]), first_step=2)):
        scanned = sampling.sample(jax_model, jnp.asarray(LATENTS), **kw, **extra)
        bar = Counter()
        stepped = sampling.sample(jax_model, jnp.asarray(LATENTS), **kw, **extra, progress=bar)
        np.testing.assert_allclose(stepped.trajectory, scanned.trajectory, rtol=0, atol=1e-6)
        np.testing.assert_allclose(stepped.latents, scanned.latents, rtol=0, atol=1e-6)
        assert bar.n == scanned.trajectory.shape[0]
    assert not np.allclose(stepped.trajectory[0], stepped.trajectory[-1])  # the steps moved x


def test_progress_compiles_each_program_once():
    sizes = sampling._initial_state_jit._cache_size(), sampling._evaluate_jit._cache_size()
    for seed in range(3):  # new noise and key: the same two programs
        sampling.sample(jax_model, jnp.asarray(LATENTS) + seed, sampler="euler_a", num_steps=3,
                        schedule=SD1_CONFIG, key=jax.random.key(seed), progress=Counter())
    assert sampling._initial_state_jit._cache_size() == sizes[0] + 1
    assert sampling._evaluate_jit._cache_size() == sizes[1] + 1


def test_progress_refuses_to_run_inside_jit():
    run = jax.jit(lambda x: sampling.sample(jax_model, x, sampler="euler", num_steps=3,
                                            schedule=SD1_CONFIG, progress=Counter()).latents)
    with pytest.raises(ValueError, match="progress= needs concrete arrays"):
        run(jnp.asarray(LATENTS))


def test_bfloat16_model_keeps_float32_arithmetic():
    """The step casts model outputs to float32; a bfloat16 model must not break the schedule."""
    bf16_model = lambda x, t: jax_model(x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)
    out = sampling.sample(bf16_model, jnp.asarray(LATENTS), sampler="euler", num_steps=10,
                          schedule=SD1_CONFIG).latents
    ref = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="euler", num_steps=10,
                          schedule=SD1_CONFIG).latents
    assert out.dtype == jnp.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=0.1)  # only the model's bf16 rounding differs


def diffusers_img2img(name, config, num_steps, strength, init_latents, noise, step_noises):
    """diffusers' StableDiffusionImg2ImgPipeline loop (get_timesteps, add_noise, the tail)."""
    import torch

    from sampler_reference import torch_model

    cls_name, overrides = DIFFUSERS[name]
    sched = _scheduler_class(cls_name).from_config(config, **overrides)
    sched.set_timesteps(num_steps)
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
    x = sched.add_noise(nchw(init_latents), nchw(noise), timesteps[:1])
    import importlib
    module = importlib.import_module(type(sched).__module__)
    current = {}
    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = lambda *a, **k: current["noise"].clone()
    if name == "dpmpp_sde":
        sched.noise_sampler = lambda s, sn: current["noise"]
    try:
        for i, t in enumerate(timesteps):
            current["noise"] = None if step_noises is None else nchw(step_noises[t_start * sched.order + i])
            out = torch_model(sched.scale_model_input(x, t), t)
            # the pipeline passes its eta (0 by default) to a step that takes one: TCD's gamma
            # would otherwise default to 0.3 in TCDScheduler.step
            x = sched.step(out, t, x, **({"eta": 0.0} if name in ("ddim", "tcd") else {})).prev_sample
    finally:
        if saved is not None:
            module.randn_tensor = saved
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_img2img_matches_diffusers(name):
    """A traced first_step masks the evaluations before t_start; add_noise as diffusers'."""
    num_steps, strength = 6, 0.6
    rng = np.random.default_rng(1)
    init = rng.standard_normal(LATENTS.shape).astype(np.float32)
    cfg = ScheduleConfig.from_config(CONFIGS["sd1"])
    plan = sampling.make_plan(name, num_steps, cfg)
    first = sampling.first_step_for_strength(plan, num_steps, strength)
    assert first == sampling.first_step_for_strength(plan, num_steps, jnp.float32(strength))
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler=name, num_steps=num_steps,
                          schedule=cfg, key=KEY, init_latents=jnp.asarray(init),
                          first_step=jnp.int32(first)).latents
    noises = np.stack([sampling.step_noise(KEY, i, LATENTS.shape)
                       for i in range(len(plan.timesteps))])
    ref = diffusers_img2img(name, CONFIGS["sd1"], num_steps, strength, init, LATENTS, noises)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("num_steps,strength", [(6, 0.6), (10, 0.75), (7, 0.3)])
def test_singlestep_third_order_img2img_matches_diffusers(num_steps, strength):
    """dpmpp_2s with solver_order=3 starting inside a (1, 2, 3) group: diffusers lowers the order
    while it has too few outputs, and so does jaxsd."""
    raw = dict(CONFIGS["sd1"], solver_order=3)
    cfg = ScheduleConfig.from_config(raw)
    plan = sampling.make_plan("dpmpp_2s", num_steps, cfg)
    first = sampling.first_step_for_strength(plan, num_steps, strength)
    init = np.random.default_rng(1).standard_normal(LATENTS.shape).astype(np.float32)
    out = sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="dpmpp_2s", num_steps=num_steps,
                          schedule=cfg, key=KEY, init_latents=jnp.asarray(init), first_step=jnp.int32(first)).latents
    ref = diffusers_img2img("dpmpp_2s", raw, num_steps, strength, init, LATENTS, None)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-5 * max(1.0, np.abs(ref).max()))


def test_first_step_for_strength_is_diffusers_get_timesteps():
    euler = sampling.make_plan("euler", 50, SD1_CONFIG)
    heun = sampling.make_plan("heun", 50, SD1_CONFIG)
    # diffusers: int(50 * 0.58) = int(28.999999999999996) = 28 kept steps, t_start = 22
    assert sampling.first_step_for_strength(euler, 50, 0.58) == 22
    assert sampling.first_step_for_strength(heun, 50, 0.58) == 44  # times scheduler.order = 2
    assert sampling.first_step_for_strength(euler, 50, 1.0) == 0
    # the traced float32 version is one step off here (documented)
    assert int(sampling.first_step_for_strength(euler, 50, jnp.float32(0.58))) == 21


def test_eta_with_a_sampler_that_has_none_is_refused():
    with pytest.raises(ValueError, match=r"eta=0\.5 is DDIM's \(and TCD's gamma\): sampler 'euler' has none"):
        sampling.sample(jax_model, jnp.asarray(LATENTS), sampler="euler", num_steps=3, schedule=SD1_CONFIG,
                        eta=0.5)
