"`kdbook bench` from the command line: a line per stage with its time, --only, --quick, Ctrl-C, errors, help."
import os, signal, subprocess, sys, time

from kdbook.bench import BENCH_STAGES, QUICK_STAGES, format_peer

CMD = [sys.executable, "-c", "import sys; from kdbook.cli import main; sys.exit(main())", "bench"]

def test_only_prints_a_line_per_stage_as_it_finishes_then_the_ratios():
    t0 = time.perf_counter()
    r = subprocess.run(CMD + ["--quick", "--only", "loader,throughput"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("[1/2] loader: DeviceLoader vs DataLoader (") and lines[0].endswith(" s)"), lines
    assert lines[1].startswith("[2/2] throughput: ") and lines[2].startswith("machine: ")
    assert lines[3].startswith("DeviceLoader vs DataLoader") and lines[4].startswith("training throughput")
    assert "TeacherBank" not in r.stdout and lines[-1].startswith("total ")
    assert time.perf_counter() - t0 < 300

def test_quick_runs_the_headline_stages():
    assert set(QUICK_STAGES) <= set(BENCH_STAGES) and len(QUICK_STAGES) < len(BENCH_STAGES)
    r = subprocess.run(CMD + ["--quick"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    stages = [l.split(":")[0].split("] ")[1] for l in r.stdout.splitlines() if l.startswith("[")]
    assert stages == list(QUICK_STAGES), r.stdout
    assert "teacher cache vs TeacherBank" in r.stdout and "teacher cache vs public way" in r.stdout, r.stdout

def test_ctrl_c_is_one_line_and_exit_130():
    p = subprocess.Popen(CMD + ["--only", "loader,teacher_bank,mmkd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stdout.readline()   # the first stage has finished: the second is running
    assert first.startswith("[1/3] loader"), first
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    lines = [l for l in err.splitlines() if l.strip() and "Warning" not in l and "warnings.warn" not in l]
    assert lines == ["kdbook: bench interrupted; a benchmark keeps nothing: run it again (--quick or --only NAME,... for less)"], err

def test_every_option_has_help_and_the_stage_names_are_listed():
    r = subprocess.run(CMD + ["--help"], capture_output=True, text=True, timeout=300)
    text = " ".join(r.stdout.split())
    for opt in ("--device", "--quick", "--only", "--peer"): assert f"{opt}" in text
    assert "where to measure: auto, cpu, cuda, cuda:N" in text
    assert "stages: " + ", ".join(BENCH_STAGES) in text and "(" + ", ".join(QUICK_STAGES) + ")" in text
    assert "measured on a 2-core CPU" in text

def test_the_peer_lines_show_no_part_as_a_difference():
    "The parts are timed alone, apart from the steps: printed beside the step time, never subtracted from it."
    res = {"images_per_s": {"kdbook": 1000.0, "plain": 800.0}, "ratios": {"kdbook/plain": 1.25}, "rounds": 2, "steps": 1,
           "dataset": "digits", "batch_size": 32, "teacher": "resnet20", "student": "resnet8", "threads": 2, "device": "cpu",
           "gpu": None, "fast": {}, "variants": {}, "loadavg": [1.0, 1.0], "torch": "2", "malloc": {},
           "parts_ms": {"kdbook": {"step": 32.0, "data": 0.2, "teacher": 40.0}, "plain": {"step": 40.0, "data": 6.0, "teacher": 45.0}}}
    text = format_peer(res)
    assert "per step 32 ms (timed alone: data 0.2 ms, teacher forward 40.0 ms)" in text
    assert "-" not in "".join(l.split("images/s")[1] for l in text.splitlines() if "images/s" in l)
