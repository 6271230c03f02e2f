"""The command line on a CPU host: libtpu stays quiet unless asked (-v, before or after the command), and
meshes larger than the host say how to emulate their devices."""

import os
import subprocess
import sys

import jax
import pytest

from m1_jax import cli, distributed, sharding

# libtpu's complaints on a host without TPU chips
LIBTPU_NOISE = ("host bounds", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")


def cpu_host_env(**extra) -> dict:
    """This environment as a user's shell would have it: no platform chosen, no TPU settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "XLA_FLAGS") and k not in distributed.TPU_USER_ENV}
    return {**env, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", **extra}  # libtpu starts even if another process holds it


def run_m1(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "m1_jax.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=cpu_host_env())


@pytest.fixture
def cpu_host_with_libtpu():
    pytest.importorskip("libtpu", reason="the [tpu] extra is not installed: nothing to keep quiet")
    if distributed.tpu_chips_present():
        pytest.skip("this host has TPU chips")


def test_libtpu_is_quiet_on_a_cpu_host_unless_asked(cpu_host_with_libtpu):
    # m1 aot loads libtpu for the topology, then stops at a user error: one line on stderr, nothing else
    argv = ["aot", "--config", "tiny", "--topology", "v5e:2x2", "--mesh", "data=-1", "--mode", "forward", "--batch", "3"]
    res = run_m1(*argv)
    assert res.returncode == 2
    assert res.stderr.startswith("m1 aot: error: ") and len(res.stderr.splitlines()) == 1, res.stderr
    assert "batch=3 is not divisible by data*fsdp*expert=4" in res.stderr
    # starting JAX's backends (what every model command does) probes libtpu too
    code = "from m1_jax import distributed; distributed.quiet_absent_tpu(); import jax; print(jax.devices())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=cpu_host_env())
    assert res.returncode == 0 and "CpuDevice" in res.stdout and res.stderr == "", res.stderr
    # -v (here after the command) shows libtpu's own messages
    res = run_m1(*argv, "-v")
    assert any(s in res.stderr for s in LIBTPU_NOISE), res.stderr


def test_tpu_settings_chosen_by_the_user_are_kept(monkeypatch):
    monkeypatch.setenv("TPU_HOST_BOUNDS", "2,2,1")
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert distributed.quiet_absent_tpu() is False
    assert os.environ["TPU_HOST_BOUNDS"] == "2,2,1" and "TPU_WORKER_HOSTNAMES" not in os.environ
    monkeypatch.delenv("TPU_HOST_BOUNDS")
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert distributed.quiet_absent_tpu() is False and "TPU_HOST_BOUNDS" not in os.environ


def test_verbose_before_or_after_the_command(tmp_path, capsys):
    missing = str(tmp_path / "absent.json")
    assert cli.main(["info", missing]) == 2  # a user error: one line
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    for argv in (["-v", "info", missing], ["info", missing, "-v"], ["info", "--verbose", missing]):
        with pytest.raises((ValueError, OSError), match="absent.json"):  # -v: the exception with its traceback
            cli.main(argv)
    assert cli.main(["info", "tiny", "-v"]) == 0


def test_a_mesh_larger_than_the_cpu_host_says_how_to_emulate_it():
    n = len(jax.devices())
    flag = f"XLA_FLAGS=--xla_force_host_platform_device_count={2 * n}"
    with pytest.raises(sharding.MeshError, match=f"needs {2 * n} devices but {n} are available.*{flag}"):
        sharding.make_mesh(f"data=2,fsdp={n}")
    with pytest.raises(sharding.MeshError, match=f"other axes use {2 * n} devices.*{flag}"):
        sharding.make_mesh(f"fsdp=-1,expert={2 * n}")
    with pytest.raises(sharding.MeshError) as e:  # fewer devices than there are: nothing to emulate
        sharding.make_mesh(f"data={n // 2}")
    assert "XLA_FLAGS" not in str(e.value)


def test_m1_train_emulates_the_devices_of_a_mesh_with_a_rest_axis():
    """`--mesh fsdp=-1,expert=8` on a CPU host: 8 emulated devices, fsdp takes the rest (1)."""
    assert distributed.mesh_devices("fsdp=-1,expert=8") == 8 and distributed.mesh_devices("data=2,fsdp=2") == 4
    assert distributed.mesh_devices("fsdp=-1", 2) == 2 and distributed.mesh_devices("fsdp=-1,expert=2", 4) == 4
    code = ("from m1_jax import distributed, sharding; distributed.setup(mesh='fsdp=-1,expert=4'); "
            "print(dict(sharding.make_mesh('fsdp=-1,expert=4').shape))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=cpu_host_env(JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "{'data': 1, 'fsdp': 1, 'expert': 4, 'tensor': 1}"
