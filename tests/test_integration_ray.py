"""The adapters on an existing Ray cluster, as users run them (``ray start``, then a driver that connects).

The test starts its own one-node cluster (``ray start --head --block`` on 127.0.0.1, 1 CPU, a temp
dir, no dashboard) in its own process group, with an environment that does NOT carry
``VERL_USE_EXTERNAL_MODULES`` and with verl's plugin discovery off, as on a cluster started before the
user's shell set anything. Workers start with this checkout (and tests/) on their path.

Teardown stops that cluster by its process group, not by ``ray stop`` (which stops every Ray cluster
of the user on the machine). Every wait has a timeout. The cluster and this test's driver run with
``RAY_AUTH_MODE=disabled``: with Ray's token authentication (Ray 2.60), a driver connecting by address
to a ``ray start --temp-dir`` cluster otherwise gets ``InvalidAuthToken`` when ``~/.ray/auth_token``
exists (someone else's Ray on the machine made it).
"""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (see requirements-integrations.txt)")
pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (see requirements-integrations.txt)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
START_TIMEOUT = 120
TASK_TIMEOUT = 180


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli():
    exe = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if exe is None:
        pytest.skip("the ray CLI is not on PATH")
    return exe


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="lkray")  # short: Ray's socket paths must stay under 107 bytes
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "RAY_ADDRESS")}
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this driver; the cluster gets it through env
    env.update(VERL_USE_EXTERNAL_PLUGINS="none", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false",
               RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    log = open(os.path.join(temp, "ray-start.log"), "w")
    proc = subprocess.Popen([ray_cli(), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp}",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"ray start exited with {proc.returncode}: {open(log.name).read()[-2000:]}")
            probe = subprocess.run([ray_cli(), "status", f"--address={address}"], env=env, capture_output=True,
                                   timeout=60)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray cluster did not come up in {START_TIMEOUT} s")
            time.sleep(2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        try:  # ray start --block stops the processes it started on SIGTERM; then the whole group
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if saved_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


def connect(address, runtime_env):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)


def test_verl_without_the_variable_fails_at_start(cluster):
    """The bug: on a cluster started without the variable, a worker's verl does not know 'lens'. The
    adapter's start-time check (what main_ppo's ray.init runs) fails with the fix in its message."""
    from lens_kernels.integrations import _ray_check
    from lens_kernels.integrations import verl as lk_verl

    connect(cluster, {})
    problem = ray.get(ray.remote(num_cpus=0, max_retries=0)(_ray_check.verl_lens_problem).remote(),
                      timeout=TASK_TIMEOUT)
    assert "lens" in problem  # "Unknown advantage estimator: lens"
    with pytest.raises(RuntimeError, match="VERL_USE_EXTERNAL_MODULES"):
        lk_verl.check_ray_cluster(timeout=TASK_TIMEOUT)
    ray.shutdown()


def test_verl_runtime_env_and_openrlhf_setup_hook_reach_the_workers(cluster, monkeypatch):
    """verl: with verl's own runtime env (get_ppo_ray_runtime_env, as main_ppo builds it for ray.init),
    the start-time check passes and a worker resolves the estimator and the loss. OpenRLHF: with the
    runtime env that lens_kernels.integrations.openrlhf_cli gives OpenRLHF's ray.init, OpenRLHF's
    PolicyLoss and compute_advantages_and_returns are lens_kernels' in a worker of the job. (One job
    for both, to start one worker. The OpenRLHF hook here first loads OpenRLHF's modules without their
    flash-attn/vLLM package imports, which a CPU machine lacks; on GPU nodes the hook is patch() alone.)"""
    import verl.trainer.constants_ppo as constants

    from lens_kernels.integrations import _ray_check, openrlhf_cli
    from lens_kernels.integrations import verl as lk_verl

    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "lens_kernels.integrations.verl")
    real_init = ray.init
    try:
        runtime_env = constants.get_ppo_ray_runtime_env()
    finally:
        ray.init = real_init  # the test connects itself, then runs the same check
    assert runtime_env["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == "lens_kernels.integrations.verl"
    openrlhf = None
    try:
        import deepspeed  # noqa: F401
        import openrlhf  # noqa: F401
    except ImportError:
        pass
    if openrlhf is not None:
        runtime_env = openrlhf_cli.with_setup_hook(runtime_env)
        assert runtime_env["worker_process_setup_hook"] == "lens_kernels.integrations.openrlhf.worker_setup"
        runtime_env["worker_process_setup_hook"] = "_openrlhf_cpu.cpu_worker_setup"
    connect(cluster, runtime_env)
    lk_verl.check_ray_cluster(timeout=TASK_TIMEOUT)
    problem = ray.get(ray.remote(num_cpus=0, max_retries=0)(_ray_check.verl_lens_problem).remote(),
                      timeout=TASK_TIMEOUT)
    assert problem == ""
    if openrlhf is not None:
        state = ray.get(ray.remote(num_cpus=0, max_retries=0)(_ray_check.openrlhf_patch_state).remote(),
                        timeout=TASK_TIMEOUT)
        assert state["openrlhf.models.loss"] == "LensPolicyLoss"
        assert state["compute_advantages_and_returns"] == "lens_kernels.integrations.openrlhf"
    ray.shutdown()
