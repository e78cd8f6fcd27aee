"""The save file's format (pvcluster/savefile.py) and the allow-listed unpickler under it (pvcluster/statepickle.py),
in-process: a file round-trips; a flipped byte, a wrong version, a truncated file, a stranger's file are refused
with a clear error; a state pickle that names anything but an allowed class, or asks to call one, loads nothing."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from hypervisor.vcpu import RunState
from pvcluster import savefile, statepickle
from pvcluster.bus.effects import SetPending
from pvcluster.bus.messages import Delivery


def image(ram: bytes = b"\x00" * 8192 + b"guest") -> dict[str, Any]:
    return {
        "format": savefile.FORMAT_VERSION, "vt_ns": 5_000_000, "window": 785, "spec": {"cluster": {"seed": 7}},
        "run_dir": "/tmp/run", "hypervisor": statepickle.dumps({"rng": random.Random(3)}),
        "domains": {1: {"state": b"state", "ram": ram, "ram_sha256": hashlib.sha256(ram).digest()}},
        "traces": {"hypervisor.jsonl": 1234, "dom1-alpha.jsonl": 99}, "faults_bytes": 0,
    }


def test_a_saved_image_reads_back_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "c.pvsave"
    size = savefile.write(path, image())
    assert size == path.stat().st_size
    data = path.read_bytes()
    assert data[:8] == b"PVCSAVE\n" and struct.unpack_from("<I", data, 8)[0] == savefile.FORMAT_VERSION
    got = savefile.read(path)
    assert got["domains"][1]["ram"].endswith(b"guest") and got["vt_ns"] == 5_000_000
    assert statepickle.loads(got["hypervisor"])["rng"].random() == random.Random(3).random()
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, renamed into place


@pytest.mark.parametrize("offset", [0, 9, 20, savefile.HEADER_BYTES + 3, -1])
def test_a_flipped_byte_anywhere_is_refused(tmp_path: Path, offset: int) -> None:
    data = bytearray(savefile.encode(image()))
    data[offset] ^= 0x01
    path = tmp_path / "bad.pvsave"
    path.write_bytes(bytes(data))
    with pytest.raises(savefile.SaveFileError) as err:
        savefile.read(path)
    assert any(word in str(err.value) for word in ("corrupt", "not a pvcluster save file", "version", "truncated"))


def test_the_checksum_is_what_catches_a_flipped_payload_byte() -> None:
    data = bytearray(savefile.encode(image()))
    data[savefile.HEADER_BYTES + 10] ^= 0x80
    with pytest.raises(savefile.SaveFileError, match="corrupt: its checksum does not match"):
        savefile.decode(bytes(data))


def test_a_wrong_version_a_truncated_file_and_a_stranger_are_refused() -> None:
    good = savefile.encode(image())
    newer = good[:8] + struct.pack("<I", savefile.FORMAT_VERSION + 1) + good[12:]
    with pytest.raises(savefile.SaveFileError, match=r"format version 2: this pvcluster reads version 1"):
        savefile.decode(newer)
    with pytest.raises(savefile.SaveFileError, match="truncated"):
        savefile.decode(good[:-5])
    with pytest.raises(savefile.SaveFileError, match="not a pvcluster save file"):
        savefile.decode(b"\x7fELF" + bytes(100))
    with pytest.raises(savefile.SaveFileError, match="not a pvcluster save file"):
        savefile.decode(b"")


def test_a_missing_file_is_a_save_file_error(tmp_path: Path) -> None:
    with pytest.raises(savefile.SaveFileError, match="cannot read"):
        savefile.read(tmp_path / "nope.pvsave")


def _framed(payload_plain: bytes, version: int = savefile.FORMAT_VERSION) -> bytes:
    """A file around a payload of one's choosing, with a correct header and checksum: what an attacker can make."""
    payload = zlib.compress(payload_plain)
    return struct.pack("<8sIQ32s", savefile.MAGIC, version, len(payload), hashlib.sha256(payload).digest()) + payload


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > /tmp/pvc-pwned",))


def test_a_well_framed_file_that_asks_to_run_code_runs_none() -> None:
    with pytest.raises(savefile.SaveFileError, match="not a state class"):
        savefile.decode(_framed(pickle.dumps(_Evil())))
    assert not Path("/tmp/pvc-pwned").exists()


def test_a_well_framed_file_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(savefile.SaveFileError, match="'hypervisor' missing"):
        savefile.decode(_framed(statepickle.dumps({**image(), "hypervisor": None})))
    with pytest.raises(savefile.SaveFileError, match="not an image"):
        savefile.decode(_framed(statepickle.dumps([1, 2, 3])))
    bad = image()
    bad["domains"][1]["ram"] = b"changed"
    with pytest.raises(savefile.SaveFileError, match="memory does not match"):
        savefile.decode(_framed(statepickle.dumps(bad)))
    with pytest.raises(savefile.SaveFileError, match="does not decompress"):
        payload = b"not zlib at all"
        savefile.decode(struct.pack("<8sIQ32s", savefile.MAGIC, 1, len(payload), hashlib.sha256(payload).digest())
                        + payload)


def test_state_pickles_load_the_projects_records_enums_and_random_streams() -> None:
    state = {"runstate": RunState.RUNNING, "queued": [Delivery(vt_ns=5, effect=SetPending(vcpu=0, port=3), seq=2)],
             "rng": random.Random("1/alpha"), "seen": {1, 2}}
    back = statepickle.loads(statepickle.dumps(state))
    assert back["runstate"] is RunState.RUNNING and back["queued"] == state["queued"] and back["seen"] == {1, 2}
    assert back["rng"].getstate() == state["rng"].getstate()


def test_state_pickles_refuse_functions_and_constructor_calls_of_project_classes() -> None:
    with pytest.raises(statepickle.StateError, match="not a state class"):
        statepickle.loads(pickle.dumps(os.system))
    with pytest.raises(statepickle.StateError, match="not a state class"):
        statepickle.loads(pickle.dumps(statepickle.dumps))  # a project function, not a class
    # REDUCE of a project class (its __init__ with arguments from the stream) is refused: only NEWOBJ makes them
    crafted = (b"\x80\x05\x8c\x0fhypervisor.link\x94\x8c\x04Link\x94\x93\x94)R\x94.")
    with pytest.raises(statepickle.StateError, match="only NEWOBJ may construct"):
        statepickle.loads(crafted)
    with pytest.raises(statepickle.StateError, match="cannot be loaded"):
        statepickle.loads(b"\x80\x05garbage")


def test_a_domain_process_loads_none_of_the_hypervisors_classes_nor_the_hypervisor_a_domains() -> None:
    from domains.link import LinkReceiver

    hv_state = statepickle.dumps({"runstate": RunState.RUNNING})
    with pytest.raises(statepickle.StateError, match="hypervisor.vcpu.RunState"):
        statepickle.loads(hv_state, modules=statepickle.DOMAIN_MODULES)
    dom_state = statepickle.dumps(LinkReceiver())
    with pytest.raises(statepickle.StateError, match="domains.link.LinkReceiver"):
        statepickle.loads(dom_state, modules=statepickle.HYPERVISOR_MODULES)
    assert isinstance(statepickle.loads(dom_state, modules=statepickle.DOMAIN_MODULES), LinkReceiver)
