"""Two CPU processes (jax.distributed, gloo) of 4 devices each train to the same losses and parameters
as one process with 8 devices."""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from flax import nnx

from m1_jax.train_loop import fit

from test_checkpoint import text_corpus, tiny_run

REPO = Path(__file__).resolve().parents[2]
MESH = "data=2,fsdp=2,expert=2,tensor=1"
STEPS = 2  # the second step starts from the first's optimizer state; one checkpoint (tiny_run saves every 2)

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
    run = tiny_run(Path({corpus!r}), {steps}, mesh={mesh!r})
    run.data.shards = 2
    s = fit(run, {workdir!r}, progress=False)
    params = {{".".join(map(str, k)): np.asarray(jax.experimental.multihost_utils.process_allgather(v, tiled=True))
              for k, v in nnx.to_flat_state(s.final_state.params())}}
    if jax.process_index() == 0:
        np.savez({out!r}, losses=np.array(s.losses), **params)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    corpus = text_corpus(tmp_path)
    out = tmp_path / "multi.npz"
    script = WORKER.format(tests=str(Path(__file__).parent), coord=f"127.0.0.1:{free_port()}", corpus=str(corpus),
                           steps=STEPS, mesh=MESH, workdir=str(tmp_path / "multi"), out=str(out))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    run = tiny_run(corpus, STEPS, mesh=MESH)
    run.data.shards = 2
    single = fit(run, str(tmp_path / "single"), progress=False)
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], single.losses, rtol=1e-6)
    for k, v in nnx.to_flat_state(single.final_state.params()):
        np.testing.assert_allclose(got[".".join(map(str, k))], np.asarray(v), rtol=1e-6, atol=1e-7, err_msg=str(k))
