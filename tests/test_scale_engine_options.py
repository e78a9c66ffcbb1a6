"""``toolkit serve --ray`` hands every replica's engines the same engine options as plain ``toolkit serve``
(memory, speculation, scheduling), and the default KV budget is shared by the replicas on one machine.

No Ray cluster: the CLI's call into ``toolkit.scale.ray_serve`` is intercepted, the replica spec it builds
goes through pickle (as Ray sends it) and a ``ToolkitReplica`` builds its app from it in this process.
"""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest
from click.testing import CliRunner

from toolkit.artifact.onnx_session import ARENA_ENV, arena_mib
from toolkit.cli import main
from toolkit.recipes import get_recipe
from toolkit.runtime import kv_cache
from toolkit.runtime.kv_cache import KvGeometry, default_kv_budget_bytes
from toolkit.scale.options import ScaleOptionsError, replica_kv_budgets, replicas_per_node

ray_serve = pytest.importorskip("toolkit.scale.ray_serve", reason="the ray extra")  # ./dev.sh test installs it

GIB = 2**30
OPTIONS = ["--kv-cache-gib", "0.01", "--prefix-cache-share", "0.5", "--malloc-trim-s", "3", "--ort-arena-mib", "64",
           "--no-prompt-lookup", "--no-predicted-outputs", "--max-draft-tokens", "4", "--step-budget-ms", "50", "--no-prefix-cache",
           "--max-batch-size", "8", "--waiting-served-ratio", "3.5", "--queued-step-budget-ms", "120"]


@pytest.fixture
def engine_dir(tiny_engine):
    return tiny_engine(get_recipe("gemma-7b-it"), "fp32")


@pytest.fixture
def machine(monkeypatch):
    """A machine of 8 GiB and 4 CPUs (what a node reports), whatever this one has; $TOOLKIT_ORT_ARENA_MIB restored after."""
    monkeypatch.setattr(kv_cache, "machine_memory_bytes", lambda: 8 * GIB)
    monkeypatch.setattr(ray_serve, "_node_cpus", lambda: 4.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv(ARENA_ENV, "")


def _plain_engine(monkeypatch, args):
    """The engine plain ``toolkit serve ARGS`` builds (uvicorn not started)."""
    from toolkit.server import serve as serve_module

    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda dirs, *a, **k: calls.append((dirs, k)))
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 0, result.output
    dirs, kwargs = calls[0]
    engine_kwargs = {k: kwargs[k] for k in ("prefix_cache", "step_budget_ms", "speculative", "memory", "max_batch_size",
                                           "waiting_served_ratio", "queued_step_budget_ms")}
    [engine] = serve_module.load_engines([p.resolve() for p in dirs], **engine_kwargs).values()
    return engine


def _replica_engine(monkeypatch, args):
    """The engine a replica of ``toolkit serve ARGS --ray`` builds from the spec the CLI made for it."""
    specs, deployed = [], []
    real_spec = ray_serve.replica_spec
    monkeypatch.setattr(ray_serve, "replica_spec", lambda *a, **k: specs.append(real_spec(*a, **k)) or specs[-1])
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda *a, **k: deployed.append((a, k)))
    result = CliRunner().invoke(main, ["serve", *args, "--ray"])
    assert result.exit_code == 0, result.output
    (dirs, _host, _port, keys, options), kwargs = deployed[0]
    kwargs = {k: v for k, v in kwargs.items() if k != "address"}
    ray_serve.build_application(dirs, keys, options, **kwargs)  # what deploy() binds; needs no cluster
    replica = ray_serve.ToolkitReplica.__new__(ray_serve.ToolkitReplica)
    asyncio.run(ray_serve.ToolkitReplica.__init__(replica, pickle.loads(pickle.dumps(specs[0]))))
    replica.__serve_build_asgi_app__()
    [entry] = replica._app.state.ctx.models.entries
    return entry.engine


def _settings(engine):
    return {"kv_budget": engine.kv.budget_bytes, "prefix_cache_blocks": engine.kv.prefix_cache_blocks,
            "config": engine.config, "speculative": engine.speculative, "malloc_trim_s": engine.trimmer.interval_s}


def test_every_serve_engine_option_reaches_each_replicas_engine_as_in_plain_serve(engine_dir, machine, monkeypatch):
    from toolkit.runtime.speculative import SpeculativeConfig

    args = [str(engine_dir), *OPTIONS, "--threads", "1"]
    plain = _settings(_plain_engine(monkeypatch, args))
    monkeypatch.setenv(ARENA_ENV, "")  # the replica must set it from its spec, not inherit the CLI's
    engine = _replica_engine(monkeypatch, [*args, "--replicas", "2"])
    assert _settings(engine) == plain
    assert engine.threads == 1 and arena_mib() == 64
    # and they are the options given, not defaults that happen to agree
    assert abs(engine.kv.budget_bytes - 0.01 * GIB) < engine.kv.block_bytes
    assert engine.kv.prefix_cache_blocks == engine.kv.total_blocks // 2
    assert (engine.config.step_budget_ms, engine.config.prefix_cache, engine.config.max_batch_size) == (50, False, 8)
    assert engine.config.waiting_served_ratio == 3.5 and engine.config.queued_step_budget_ms == 120
    assert engine.speculative == SpeculativeConfig(prompt_lookup=False, predicted_outputs=False, max_draft=4)
    assert engine.trimmer.interval_s == 3


def test_default_kv_budget_is_shared_by_the_replicas_on_a_machine(engine_dir, machine, monkeypatch):
    plain = _plain_engine(monkeypatch, [str(engine_dir)])
    two = _replica_engine(monkeypatch, [str(engine_dir), "--replicas", "2", "--threads", "1"])
    one = _replica_engine(monkeypatch, [str(engine_dir), "--replicas", "1"])
    block = plain.kv.block_bytes
    assert abs(plain.kv.budget_bytes - 8 * GIB // 10) < block  # a tenth of the (patched) machine
    assert abs(one.kv.budget_bytes - plain.kv.budget_bytes) < block
    assert abs(two.kv.budget_bytes - plain.kv.budget_bytes / 2) < block
    # autoscaling: the most replicas that may run (8), but only 2 of 2 CPUs each fit on a 4-CPU node
    auto = _replica_engine(monkeypatch, [str(engine_dir), "--max-replicas", "8", "--threads", "2"])
    assert abs(auto.kv.budget_bytes - plain.kv.budget_bytes / 2) < block


def test_replicas_per_node_is_bounded_by_the_replica_count_and_the_nodes_cpus():
    assert replicas_per_node(2, node_cpus=16, replica_cpus=1) == 2
    assert replicas_per_node(8, node_cpus=16, replica_cpus=4) == 4
    assert replicas_per_node(3, node_cpus=1, replica_cpus=2) == 1


def test_replica_kv_budgets_divide_the_default_keep_a_given_budget_and_refuse_more_than_the_machine(engine_dir):
    from toolkit.artifact.manifest import load_manifest

    manifest = load_manifest(engine_dir, verify_hashes=False)
    per_token = KvGeometry.of_layout(manifest.kv_layout).bytes_per_token
    one = default_kv_budget_bytes(per_token, manifest.context_length, 8 * GIB)
    assert replica_kv_budgets([engine_dir], None, 1, 8 * GIB) == {engine_dir: one}
    assert replica_kv_budgets([engine_dir], None, 4, 8 * GIB) == {engine_dir: one // 4}
    assert replica_kv_budgets([engine_dir], GIB, 4, 8 * GIB) == {engine_dir: GIB}  # --kv-cache-gib: per replica
    with pytest.raises(ScaleOptionsError, match="more than its 8.0 GiB"):
        replica_kv_budgets([engine_dir], 3 * GIB, 4, 8 * GIB)


def test_local_replicas_whose_kv_exceeds_the_machine_are_refused_before_ray_starts(engine_dir, machine, monkeypatch):
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda *a, **k: pytest.fail("Ray started"))
    result = CliRunner().invoke(main, ["serve", str(engine_dir), "--ray", "--replicas", "2", "--kv-cache-gib", "5"])
    assert result.exit_code == 2 and "--kv-cache-gib" in result.output, result.output
    # a remote cluster's nodes are checked by each replica as it starts (replica_kv_budgets), not here
    monkeypatch.setattr(ray_serve, "serve_on_ray", lambda *a, **k: None)
    result = CliRunner().invoke(main, ["serve", str(engine_dir), "--ray", "--replicas", "2", "--kv-cache-gib", "5",
                                       "--address", "ray://head:10001"])
    assert result.exit_code == 0, result.output
