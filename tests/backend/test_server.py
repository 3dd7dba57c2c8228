"""The stdio server as a subprocess: the message sequence of fits, stop and shutdown, and
50 malformed inputs that each get an `error` while the server keeps serving."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sds_backend import protocol
from server_process import ServerProcess

V = protocol.PROTOCOL_VERSION
FAST = {"shape_steps": 40, "render_size": 64, "guidance_resolution": 64, "event_every": 1, "texture_size": 64, "gif_frames": 3,
        "checkpoint_every": 0}


@pytest.fixture(scope="module")
def _servers():
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.close()


@pytest.fixture
def server(_servers, tmp_path_factory):
    """The module's `serve` process, shared (each start costs seconds of imports and a model
    load); after a test that shut it down the next test gets a new one."""
    if _servers and _servers[-1].proc.poll() is None:
        process = _servers[-1]
        assert process.lines.empty(), process.lines.get()     # the last test read all it was sent
        return process
    process = ServerProcess(tmp_path_factory.mktemp("server"))
    _servers.append(process)
    hello = process.next(60)
    assert hello["type"] == "hello" and hello["protocol"] == protocol.PROTOCOL_VERSION
    assert hello["device"] == "cpu" and hello["pid"] == process.proc.pid
    return process


def test_fifty_malformed_inputs_each_get_an_error(server, tiny_sd_dir, tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cases = _malformed_inputs(str(tiny_sd_dir), tmp_path)
    assert len(cases) >= 50
    for data, kind in cases:
        server.send_raw(data)
        reply = server.reply(120)
        assert reply["type"] == "error", (data[:80], reply)
        assert reply["kind"] == kind, (data[:80], reply)
        assert reply["recoverable"] is True
        assert reply["message"]
    assert server.proc.poll() is None
    # a stop with no fit running is not an error: nothing to stop, nothing to say
    server.send("stop")
    # and it still works
    server.send("fit", id="after", prompt="a man", model=str(tiny_sd_dir), config=dict(FAST, shape_steps=1),
                job_dir=str(tmp_path / "ok"))
    done, seen = server.until("done")
    assert done["id"] == "after" and not any(m["type"] == "error" for m in seen)


def test_fit_progress_texture_busy_stop_second_fit_shutdown(server, tiny_sd_dir, tmp_path):
    # 1. a full fit with both stages: progress events, texture events, one done
    config = dict(FAST, stages=["shape", "texture"], shape_steps=4, texture_steps=4, texture_every=2)
    server.send("fit", id="first", prompt="an old man", model=str(tiny_sd_dir), config=config, job_dir=str(tmp_path / "a"))
    done, seen = server.until("done")
    kinds = [m["type"] for m in seen]
    assert "error" not in kinds
    # while the model loads (diffusers alone takes seconds to import) heartbeats say so
    loading = [m for m in seen if m["type"] == "progress" and m["stage"] == "loading"]
    assert all(m["iteration"] == 0 and m["total"] == 8 for m in loading)
    progress = [m for m in seen if m["type"] == "progress" and m["stage"] != "loading"]
    assert [m["iteration"] for m in progress] == list(range(1, 9))
    assert {m["stage"] for m in progress} == {"shape", "texture"}
    textures = [m for m in seen if m["type"] == "texture"]
    assert len(textures) >= 2 and Path(textures[-1]["path"]).exists()
    assert done["id"] == "first" and not done["stopped"] and done["iterations"] == 8
    assert done["weights"] == progress[-1]["weights"]
    assert {"weights", "texture", "glb", "gif"} <= set(done["outputs"])

    # 2. a fit asked for while one runs is refused, and the running one goes on
    server.send("fit", id="second", prompt="a young woman", model=str(tiny_sd_dir), config=FAST,
                job_dir=str(tmp_path / "b"))
    server.until("progress")
    server.send("fit", id="eager", prompt="a man", model=str(tiny_sd_dir), config=FAST, job_dir=str(tmp_path / "e"))
    reply = server.next()
    while reply["type"] == "progress":
        reply = server.next()
    assert reply["type"] == "error" and reply["kind"] == "busy" and reply["id"] == "eager"
    assert not (tmp_path / "e").exists()

    # 3. stop mid-run: the fit ends within one iteration of the stop arriving
    last_seen, _ = server.until("progress")
    while last_seen["iteration"] < 3:
        last_seen = server.next()
    last_seen = server.drain(last_seen)      # the newest iteration this client knows of when it stops
    server.send("stop", id="second")
    done, seen = server.until("done")
    assert done["stopped"] is True
    # the iteration running when the stop arrives ends the fit; at most one more progress line can
    # already be on its way when the stop is sent
    later = [m["iteration"] for m in seen if m["type"] == "progress"]
    assert len(later) <= 2, f"fit went on for {later} after the stop"
    assert last_seen["iteration"] <= done["iterations"] <= last_seen["iteration"] + 2
    assert done["iterations"] < FAST["shape_steps"]

    # 4. the same process serves another fit after a stop
    server.send("fit", id="third", prompt="a child", model=str(tiny_sd_dir), config=dict(FAST, shape_steps=2),
                job_dir=str(tmp_path / "c"), outputs=["weights"])
    done, _ = server.until("done")
    assert done["id"] == "third" and done["iterations"] == 2
    # only the requested output is written: a client that exports itself gets `done` sooner
    assert set(done["outputs"]) == {"weights"}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["weights.json"]

    # 5. shutdown during a fit: the fit stops, reports exactly one done, and the process exits 0
    server.send("fit", id="fourth", prompt="a child", model=str(tiny_sd_dir), config=dict(FAST, shape_steps=500),
                job_dir=str(tmp_path / "d"), outputs=[])
    server.until("progress")
    server.send("shutdown")
    done, seen = server.until("done")
    assert done["id"] == "fourth" and done["stopped"] and done["outputs"] == {}
    assert not any(m["type"] in ("done", "error") for m in seen[:-1])
    assert server.proc.wait(30) == 0
    assert server.lines.empty()


def _malformed_inputs(model: str, tmp_path: Path) -> list[tuple[bytes, str]]:
    """(line, expected error kind): 50 ways to get a request wrong."""
    def line(obj) -> bytes:
        return (json.dumps(obj) + "\n").encode()

    def fit(**fields) -> bytes:
        base = {"v": V, "type": "fit", "id": "x", "prompt": "a man", "model": model, "config": dict(FAST, shape_steps=1),
                "job_dir": str(tmp_path / "bad")}
        base.update(fields)
        return line({k: v for k, v in base.items() if v is not ...})

    bad_json = [b"{\n", b"not json\n", b"{'single': 'quotes'}\n", b'{"v": %d, "type": "fit",}\n' % V, b"[1, 2\n",
                b"\xff\xfe\xfd\n", b'{"v": %d, "type": "stop"} trailing\n' % V, b"nul\x00l\n"]
    cases = [(data, "bad_message") for data in bad_json]
    cases += [(line(value), "bad_message") for value in ([], 3, "fit", None, True)]
    cases += [
        (line({"type": "fit"}), "bad_message"),                                   # no version
        (line({"v": V + 1, "type": "stop"}), "bad_message"),                      # wrong version
        (line({"v": str(V), "type": "stop"}), "bad_message"),
        (line({"v": 1}), "bad_message"),                                          # no type
        (line({"v": V, "type": "dance"}), "bad_message"),                         # unknown type
        (line({"v": V, "type": "progress", "id": "a"}), "bad_message"),           # backend-only type
        (line({"v": V, "type": "hello"}), "bad_message"),
        (line({"v": V, "type": "stop", "extra": 1}), "bad_message"),              # unknown field
        (b'{"v": %d, "type": "stop", "id": "' % V + b"x" * (protocol.MAX_LINE_BYTES + 10) + b'"}\n', "bad_message"),
        (fit(id=...), "bad_message"),                                             # missing id
        (fit(id=7), "bad_message"),
        (fit(prompt=...), "bad_message"),
        (fit(prompt=["a", "b"]), "bad_message"),
        (fit(prompt=""), "bad_request"),
        (fit(prompt="   "), "bad_request"),
        (fit(prompt="x" * 3000), "bad_request"),
        (fit(negative_prompt=5), "bad_message"),
        (fit(model=12), "bad_message"),
        (fit(config="fast"), "bad_message"),
        (fit(config={"shape_steps": -1}), "bad_request"),
        (fit(config={"shape_steps": "many"}), "bad_request"),
        (fit(config={"stages": ["colour"]}), "bad_request"),
        (fit(config={"stages": []}), "bad_request"),
        (fit(config={"lr": 0}), "bad_request"),
        (fit(config={"render_size": 100000}), "bad_request"),
        (fit(config={"no_such_knob": 1}), "bad_request"),
        (fit(config={"yaw_range": [10, -10]}), "bad_request"),
        (fit(initial_weights="zeros"), "bad_message"),
        (fit(initial_weights=[0.0, "a"]), "bad_message"),
        (fit(initial_weights=[0.0] * 3), "bad_request"),                          # wrong count
        (fit(initial_weights=[0.0] * 49 + [1e400]), "bad_message"),               # inf after parsing
        (b'{"v": %d, "type": "fit", "id": "x", "prompt": "a", "initial_weights": [NaN]}\n' % V, "bad_message"),
        (b'{"v": %d, "type": "fit", "id": "x", "prompt": "a", "initial_weights": [Infinity]}\n' % V, "bad_message"),
        (fit(model=str(tmp_path / "no-such-model")), "model_error"),
        (fit(model="nobody/no-such-model-anywhere"), "model_error"),
        (fit(bundle=str(tmp_path / "missing.npz")), "bundle_error"),
        (fit(bundle=str(tmp_path / "broken.npz")), "bundle_error"),
        (fit(bundle=5), "bad_message"),
        (fit(job_dir=7), "bad_message"),
        (fit(outputs=["weights", "movie"]), "bad_message"),
        (line({"v": V, "type": "stop", "id": 3}), "bad_message"),
        (line({"v": V, "type": [1]}), "bad_message"),                             # unhashable type
        (line({"v": V, "type": {}}), "bad_message"),
        (line({"v": True, "type": "stop"}), "bad_message"),                       # a bool is not a version
        (b"[" * 100000 + b"\n", "bad_message"),                                   # nested too deep
        (b'{"v": %d, "type": "stop", "id": ' % V + b"9" * 5000 + b"}\n", "bad_message"),  # int too long
    ]
    return cases


def test_end_of_input_shuts_down(tmp_path):
    process = ServerProcess(tmp_path)
    assert process.next(60)["type"] == "hello"
    process.proc.stdin.close()
    assert process.proc.wait(30) == 0


def test_a_fit_request_with_keys_and_bounds_round_trips():
    line = protocol.encode("fit", id="r", prompt="a rig", initial_weights=[0.25, 0.0], keys=["brow"],
                           bounds={"brow": [0.0, 1.0], "jaw": [-1.0, 1.0]})
    message = protocol.decode(line, protocol.CLIENT_TYPES)
    assert message["keys"] == ["brow"] and message["bounds"] == {"brow": [0.0, 1.0], "jaw": [-1.0, 1.0]}
    for bad in ({"keys": "brow"}, {"bounds": {"brow": [0.0]}}, {"bounds": {"brow": [0.0, "1"]}}):
        with pytest.raises(protocol.ProtocolError, match="must be"):
            protocol.encode("fit", id="r", prompt="a rig", **bad)

