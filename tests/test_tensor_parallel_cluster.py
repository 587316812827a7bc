"""Multi-node tensor parallelism: a TP=2 group spans the two nodes of a ``ray.cluster_utils.Cluster``,
and killing its rank actor under load fails the requests in flight cleanly (a retryable 503, or a
stream's error event) and makes Serve replace the replica with a working one.

The cluster cannot share the session's Ray inside one process, so tests/tp_multinode.py runs it
in a subprocess with a hard timeout (it shuts its cluster down itself; the process group is
killed if it overruns).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_tp2_group_spans_two_nodes_and_recovers_from_a_dead_rank(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TRISERVE_API_KEY": ""}
    env.pop("RAY_ADDRESS", None)
    with (tmp_path / "stderr.log").open("w") as err:  # Ray's logs: read only when the script gives no result
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "tp_multinode.py")],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out[-2000:] + (tmp_path / "stderr.log").read_text(errors="replace")[-4000:]
    result = json.loads(lines[-1])
    assert proc.returncode == 0, (result, (tmp_path / "stderr.log").read_text(errors="replace")[-4000:])
    # one two-bundle group, its bundles on two different nodes
    [nodes] = result["groups_before"].values()
    assert len(set(nodes)) == 2
    assert result["first"] == result["expected"]
    # the requests in flight when the rank died completed or got a clean retryable error, none hung
    # (before: 500s; and the surviving rank waited out gloo's 300 s timeout)
    under_load = result["under_load"]
    assert under_load["other"] == [] and under_load["hangs"] == 0 and under_load["ok"] > 0, under_load
    # the killed rank's replica was replaced: a new rank actor in a new group, still spanning both nodes
    assert result["killed"] not in [name for _, name in result["ranks_after"]] and result["ranks_after"]
    assert not set(result["groups_after"]) & set(result["groups_before"])
    [nodes_after] = result["groups_after"].values()
    assert len(set(nodes_after)) == 2
    assert result["second"] == result["expected"]
