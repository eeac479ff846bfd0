"""backend(), the env switches and the build record."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gradguard
from gradguard import _extension


def run_py(code: str, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_backend_reports_every_device_and_reason():
    b = gradguard.backend()
    assert set(b) >= {"cpu", "cuda", "extension_loaded", "reason", "build"}
    assert b["cpu"] in ("extension", "reference") and b["cuda"] in ("extension", "reference")
    if b["extension_loaded"]:
        assert b["reason"] is None and b["cpu"] == "extension"
        assert b["build"]["torch"] == torch.__version__
    else:
        assert isinstance(b["reason"], str) and b["reason"]


def test_disable_switch_forces_reference_and_says_so():
    r = run_py("import gradguard, json; print(json.dumps(gradguard.backend()))", GRADGUARD_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout.strip().splitlines()[-1])
    assert b["cpu"] == "reference" and b["cuda"] == "reference" and not b["extension_loaded"]
    assert "GRADGUARD_DISABLE_EXT" in b["reason"]


def test_require_switch_turns_missing_extension_into_import_error():
    r = run_py("import gradguard", GRADGUARD_DISABLE_EXT="1", GRADGUARD_REQUIRE_EXT="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "GRADGUARD_REQUIRE_EXT" in r.stderr


def test_build_record_with_other_torch_version_is_refused_with_a_sentence(tmp_path, monkeypatch):
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"torch": "1.0.0"}))
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", record)
    monkeypatch.delenv("GRADGUARD_DISABLE_EXT", raising=False)
    reason = _extension._try_load()
    assert "torch version mismatch" in reason and "1.0.0" in reason and torch.__version__ in reason


def test_missing_or_failed_build_record_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADGUARD_DISABLE_EXT", raising=False)
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", tmp_path / "absent.json")
    assert _extension._try_load().startswith("not built: no build record")
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"torch": torch.__version__, "error": "build failed: CompileError: boom"}))
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", failed)
    assert _extension._try_load() == "not built: build failed: CompileError: boom"


@pytest.mark.skipif(not gradguard.backend()["extension_loaded"], reason="extension not loaded")
def test_cpu_kernel_is_registered_under_the_cpu_key():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradguard::multi_tensor_stats", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradguard::zero_nonfinite_and_scale_", "CPU")


def test_disable_switch_set_to_false_keeps_the_extension():
    r = run_py("import gradguard, json; print(json.dumps(gradguard.backend()))", GRADGUARD_DISABLE_EXT="false")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout.strip().splitlines()[-1])
    assert "GRADGUARD_DISABLE_EXT" not in str(b["reason"])
    built = _extension._read_build_info()
    if built is not None and not built.get("error") and built.get("torch") == torch.__version__:
        assert b["extension_loaded"] and b["cpu"] == "extension"


def test_unknown_switch_value_fails_the_import_naming_the_variable():
    r = run_py("import gradguard", GRADGUARD_DISABLE_EXT="nope")
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "GRADGUARD_DISABLE_EXT='nope'" in r.stderr


# In-process from here: _try_load returns before importing gradguard._C when disabled, and a bad
# value raises before anything is loaded, so this process's kernels are never changed; load()'s
# record of what was loaded is put back by monkeypatch.

@pytest.mark.parametrize("value", ["0", "no", "off", "", "FALSE", " Off "])
def test_disable_switch_off_values_do_not_disable(value, monkeypatch):
    monkeypatch.setenv("GRADGUARD_DISABLE_EXT", value)
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", _extension._BUILD_INFO_PATH.with_name("absent.json"))
    assert _extension._try_load().startswith("not built")  # got past the switch


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " On "])
def test_disable_switch_on_values_disable(value, monkeypatch):
    monkeypatch.setenv("GRADGUARD_DISABLE_EXT", value)
    assert _extension._try_load() == "disabled by GRADGUARD_DISABLE_EXT"


@pytest.mark.parametrize("name", ["GRADGUARD_DISABLE_EXT", "GRADGUARD_REQUIRE_EXT"])
@pytest.mark.parametrize("value", ["2", "disable", "1.0"])
def test_unknown_switch_values_are_errors_naming_the_variable(name, value, monkeypatch):
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    monkeypatch.setenv("GRADGUARD_DISABLE_EXT", "1")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        _extension.load()


@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
def test_require_switch_off_values_do_not_require(value, monkeypatch):
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    monkeypatch.setenv("GRADGUARD_DISABLE_EXT", "1")
    monkeypatch.setenv("GRADGUARD_REQUIRE_EXT", value)
    _extension.load()


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_require_switch_on_values_require(value, monkeypatch):
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    monkeypatch.setenv("GRADGUARD_DISABLE_EXT", "1")
    monkeypatch.setenv("GRADGUARD_REQUIRE_EXT", value)
    with pytest.raises(ImportError, match="GRADGUARD_REQUIRE_EXT"):
        _extension.load()


def test_env_switch_rule(monkeypatch):
    monkeypatch.delenv("GG_TEST_SWITCH", raising=False)
    assert _extension.env_switch("GG_TEST_SWITCH") is False
    monkeypatch.setenv("GG_TEST_SWITCH", "enable")
    with pytest.raises(ValueError, match=r"GG_TEST_SWITCH='enable'.*1/true/yes/on.*0/false/no/off"):
        _extension.env_switch("GG_TEST_SWITCH")


# --- the build record of the two kernel modules, and setup.py's switches -------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_of_a_failed_cpu_side_is_the_reason(tmp_path, monkeypatch):
    # What an aarch64 host without the guards wrote: the CPU module failed, nothing else built.
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"torch": torch.__version__, "cpu_kernels": False, "cuda_kernels": False,
                                  "cpu_error": "build failed: CompileError: target('avx2') is not valid"}))
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", record)
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    monkeypatch.delenv("GRADGUARD_DISABLE_EXT", raising=False)
    assert _extension._try_load() == "CPU kernels not built: build failed: CompileError: target('avx2') is not valid"


@pytest.mark.skipif(_extension.env_switch("GRADGUARD_DISABLE_EXT") or not gradguard.backend()["extension_loaded"],
                    reason="needs the CPU module loaded (importing it here would register its kernels)")
def test_record_of_a_failed_cuda_side_keeps_the_cpu_kernels_and_says_why(tmp_path, monkeypatch):
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"torch": torch.__version__, "cpu_kernels": True, "cuda_kernels": False,
                                  "cuda_error": "build failed: CompileError: nvcc boom"}))
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", record)
    monkeypatch.setattr(_extension, "_state", dict(_extension._state))
    assert _extension._try_load() is None
    assert _extension._state["modules"] == ["gradguard._C"]
    assert _extension._state["partial"] == "CUDA kernels not built: build failed: CompileError: nvcc boom"


def test_build_record_names_what_was_built():
    build = _extension._read_build_info()  # the file: other tests here swap the loaded record
    if build is None or build.get("error"):
        pytest.skip(f"no successful build here: {build}")
    assert isinstance(build["cpu_kernels"], bool) and isinstance(build["cuda_kernels"], bool)
    assert build["cuda_kernels"] or build.get("cuda_skipped") or build.get("cuda_error")
    assert build["machine"] and build["torch"] == torch.__version__


def _setup_py(*args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("GRADGUARD_")}
    return subprocess.run([sys.executable, "setup.py", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**full, **env}, timeout=300)


@pytest.mark.parametrize("value", ["maybe"])
def test_setup_py_refuses_a_switch_value_it_cannot_read(value):
    r = _setup_py("--name", GRADGUARD_BUILD_CUDA=value)
    assert r.returncode != 0
    assert f"GRADGUARD_BUILD_CUDA={value!r} is not a boolean switch" in r.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
@pytest.mark.parametrize("value", ["YES", "on"])
def test_setup_py_build_cuda_true_without_cuda_torch_is_an_error(value):
    r = _setup_py("--name", GRADGUARD_BUILD_CUDA=value)
    assert r.returncode != 0 and "the CUDA kernels cannot be built: torch is a CPU-only build" in r.stderr


@pytest.mark.parametrize("value", ["Off", ""])
def test_setup_py_false_switch_configures_without_writing_a_record(value, tmp_path):
    record = os.path.join(ROOT, "gradguard", "_build_info.json")
    before = os.stat(record).st_mtime_ns if os.path.exists(record) else None
    r = _setup_py("--name", GRADGUARD_BUILD_CUDA=value, GRADGUARD_REQUIRE_EXT=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "gradguard"
    after = os.stat(record).st_mtime_ns if os.path.exists(record) else None
    assert after == before  # the record is written by the build step, not by importing setup.py


@pytest.mark.parametrize("disable", ["0", "1"])
def test_everyday_use_emits_no_warning(disable):
    # Under -W error (pytest's filterwarnings = error) a plain GradGuard() raised: it imported
    # torch.distributed.optim to recognize ZeRO, which fires 67 DeprecationWarnings of torch.jit.
    code = """if True:
        import torch, gradguard
        m = torch.nn.Linear(3, 1)
        opt = gradguard.GradGuard(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=1.0, model=m)
        m(torch.randn(2, 3)).sum().backward()
        opt.step(); opt.summary(); opt.last.as_dict()
        gradguard.clip_grad_norm_(m.parameters(), 1.0)
        gradguard.grad_stats([p.grad for p in m.parameters()]).total_norm.item()
        gradguard.safe_log(torch.rand(3, requires_grad=True)).sum().backward()
        tracer = gradguard.NanTracer(m)
        m(torch.randn(2, 3)); tracer.first_nonfinite()
        print("ok")
    """
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                       env={**os.environ, "GRADGUARD_DISABLE_EXT": disable}, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
