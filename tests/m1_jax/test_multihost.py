"""Two CPU processes (jax.distributed, gloo) of 4 devices each train to the same losses and parameters
as one process with 8 devices (the shared 2-step run, tests/m1_jax/conftest.py)."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from test_checkpoint import final_params_of, losses_of

REPO = Path(__file__).resolve().parents[2]
MESH = "data=2,fsdp=2,expert=2,tensor=1"  # tiny_run's, as the shared run's

WORKER = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    from m1_jax import distributed
    distributed.setup(coordinator={coord!r}, num_processes=2, process_id=int(sys.argv[1]), cpu_devices=4)
    import jax, numpy as np
    from flax import nnx
    from pathlib import Path
    from test_checkpoint import tiny_run
    from m1_jax.train_loop import fit
    run = tiny_run(Path({corpus!r}), {steps}, mesh={mesh!r})  # two data shards: one per process
    s = fit(run, {workdir!r}, progress=False)
    params = {{"/".join(map(str, k)): np.asarray(jax.experimental.multihost_utils.process_allgather(v, tiled=True))
              for k, v in nnx.to_flat_state(s.final_state.params())}}
    if jax.process_index() == 0:
        np.savez({out!r}, losses=np.array(s.losses), **params)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(trained_workdir, trained_corpus, tmp_path):
    out = tmp_path / "multi.npz"
    single = list(losses_of(trained_workdir).values())  # one process, the same steps
    script = WORKER.format(tests=str(Path(__file__).parent), coord=f"127.0.0.1:{free_port()}",
                           corpus=str(trained_corpus), steps=len(single), mesh=MESH, workdir=str(tmp_path / "multi"),
                           out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    got = np.load(out)
    np.testing.assert_allclose(got["losses"], single, rtol=1e-6)
    want = final_params_of(trained_workdir)
    assert set(got.files) == set(want) | {"losses"}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
