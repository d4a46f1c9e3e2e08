"""Nobody let in: the MLflow server listens on loopback, checkpoints load without running code,
no config value reaches a shell, and config strings cannot steer files out of their folders."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml

from suite import run_logger
from suite.config import ConfigError, RunConfig
from suite.sweeps import SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parents[1]
PY_FILES = [
    p
    for p in ROOT.rglob("*.py")
    if not ({".venv", "runs", "mlruns", "data", ".git", "build"} & set(p.relative_to(ROOT).parts))
]


# ============================================================================ MLflow server bind
def _listeners(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` (/proc/net/tcp and tcp6)."""
    out = []
    for name, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].split(":")
            if f[3] != "0A" or int(p, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                import ipaddress

                ip = ipaddress.IPv6Address(raw)
                out.append(str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip))
            else:
                out.append(".".join(str(b) for b in raw[::-1]))
    return out


@pytest.mark.slow  # needs the MLflow server scripts/services.sh starts
def test_mlflow_server_listens_on_loopback_only(mlflow_server):
    """The server scripts/services.sh starts binds 127.0.0.1 unless HFBENCH_MLFLOW_HOST says otherwise."""
    port = urlparse(mlflow_server).port
    found = _listeners(port)
    assert found, (
        f"no socket listens on port {port} of HFBENCH_MLFLOW_URI={mlflow_server}: the MLflow server "
        "is not running (start it with scripts/services.sh start, or run scripts/test.sh)"
    )
    wanted = os.environ.get("HFBENCH_MLFLOW_HOST") or "127.0.0.1"
    if wanted == "127.0.0.1":
        assert set(found) == {"127.0.0.1"}, f"MLflow listens on {found}, not only on 127.0.0.1"
    else:  # the user asked for another address: it listens exactly there
        assert set(found) == {"0.0.0.0" if wanted == "0.0.0.0" else wanted}, found


def test_services_script_documents_and_checks_the_bind_host():
    usage = subprocess.run(["bash", str(ROOT / "scripts/services.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "HFBENCH_MLFLOW_HOST" in usage.stderr and "127.0.0.1" in usage.stderr
    bad = subprocess.run(
        ["bash", str(ROOT / "scripts/services.sh"), "status", "/nonexistent-hfbench"],
        env=dict(os.environ, HFBENCH_MLFLOW_HOST="127.0.0.1;touch pwned"),
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    assert bad.returncode == 2 and "bad HFBENCH_MLFLOW_HOST" in bad.stderr
    text = (ROOT / "scripts/services.sh").read_text()
    assert 'MLFLOW_HOST="${HFBENCH_MLFLOW_HOST:-127.0.0.1}"' in text and '--host "$MLFLOW_HOST"' in text


# ============================================================================ pickles
class _Evil:
    """Unpickling this calls open(marker, 'w'): code execution that leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path, **extra) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(marker), **extra}, path)
    return path


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """Control: without weights_only the payload does run, so the tests below mean something."""
    marker = tmp_path / "control-marker"
    torch.load(_evil_checkpoint(tmp_path / "control.pt", marker), map_location="cpu", weights_only=False)
    assert marker.exists()


def test_load_weights_refuses_a_malicious_pickle(tmp_path):
    from suite.engine import load_weights

    marker = tmp_path / "marker"
    p = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(Exception) as e:
        load_weights(p)
    assert "weights" in str(e.value).lower() or "unpickl" in type(e.value).__name__.lower(), e.value
    assert not marker.exists(), "loading the starting weights executed code from the file"


def test_checkpoint_resume_refuses_a_malicious_pickle(tmp_path, monkeypatch):
    """train() finds <out_dir>/<hash>/last.pt and resumes from it: a hostile last.pt is refused."""
    from suite import engine

    cfg = RunConfig(
        method="dense",
        epochs=1,
        out_dir=str(tmp_path / "runs"),
        data_dir=str(tmp_path / "data"),
        engine={"device": "cpu", "deterministic": False},
    )
    marker = tmp_path / "marker"
    ckpt = engine.run_dir(cfg) / "last.pt"
    ckpt.parent.mkdir(parents=True)
    _evil_checkpoint(ckpt, marker, run_hash=cfg.run_hash())
    # no process group for this: the checkpoint is read right after it
    monkeypatch.setattr(engine, "setup_distributed", lambda device: (0, 1, 0))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(Exception) as e:
        engine.train(cfg)
    assert "weights" in str(e.value).lower() or "unpickl" in type(e.value).__name__.lower(), e.value
    assert not marker.exists(), "resuming from a checkpoint executed code from the file"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_every_torch_load_is_weights_only():
    found = []
    for p in PY_FILES:
        if p == Path(__file__).resolve():
            continue  # the control above loads unsafely on purpose
        for node, owner, name in _calls(ast.parse(p.read_text(), str(p))):
            if owner == "torch" and name == "load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}" + ("" if ok else " NOT weights_only=True"))
    assert found, "no torch.load found at all: the scan is broken"
    assert not [f for f in found if "NOT" in f], found


# ============================================================================ shells
def test_no_shell_anywhere():
    """Every subprocess call takes an argument list; nothing goes through a shell."""
    bad = []
    for p in PY_FILES:
        for node, owner, name in _calls(ast.parse(p.read_text(), str(p))):
            where = f"{p.relative_to(ROOT)}:{node.lineno}"
            if owner == "os" and (name in ("system", "popen") or name.startswith("spawn")):
                bad.append(f"{where} os.{name}")
            if owner == "subprocess":
                if name in ("getoutput", "getstatusoutput"):
                    bad.append(f"{where} subprocess.{name}")
                for k in node.keywords:
                    if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                        bad.append(f"{where} shell=")
                if (
                    name in ("run", "Popen", "call", "check_call", "check_output")
                    and node.args
                    and not isinstance(node.args[0], (ast.List, ast.Tuple, ast.Name, ast.Starred))
                ):
                    bad.append(f"{where} subprocess.{name} with a {type(node.args[0]).__name__} command")
    assert not bad, bad


HOSTILE = [
    "x; rm -rf ./victim",
    "$(touch pwned)",
    "`touch pwned`",
    "a && touch pwned",
    "a | touch pwned",
    "'; touch pwned; '",
    '"; touch pwned; "',
    "$(touch pwned)`touch pwned`",
    "x\ntouch pwned",
    "--help",
    "-rf",
    "../pwned",
    "pwned\0",
    "* ?[a]",
    "~",
    "$HOME/pwned",
]
# the sweep fields a value can come through, and where it lands
FIELDS = [
    "name",
    "experiment",
    "out_dir",
    "data_dir",
    "launcher.folder",
    "launcher.slurm.partition",
    "launcher.slurm.account",
    "launcher.slurm.extra.comment",
    "base.tracking_uri",
    "base.experiment",
]


def _hostile_sweep(field: str, value: str, tmp: Path) -> dict:
    d = {
        "name": "hostile",
        "base": {"epochs": 2},
        "grid": {"methods": ["dense", "gmp"], "sparsities": [0.5]},
        "launcher": {"executor": "local", "folder": "submitit"},
        "out_dir": "runs",
        "data_dir": "data",
    }
    cur = d
    parts = field.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return d


def _no_pwned(tree: Path, *dirs: Path) -> list[str]:
    """Files named like 'pwned' anywhere under `tree`, or directly in `dirs` (where a shell
    running in them would have put them)."""
    hits = [str(p) for p in tree.rglob("pwned") if p.is_file()]  # (a folder may be *named* '$HOME/pwned')
    for d in dirs:
        hits += [str(p) for p in d.glob("pwned")]
    return hits


def test_hostile_values_are_refused_or_inert(tmp_path, monkeypatch):
    """Each hostile value in each field is refused with an error naming the field, or flows through
    expansion, run folders, weights files, the job log, the MLflow experiment and run, the git and
    environment helpers, the data check and the generated sbatch script (executed by bash with a
    stand-in srun) without anything being run by a shell or written outside the working dir."""
    from launchers.checks import ensure_data
    from launchers.sweep import Sweep, jobs_file, make_executor
    from suite import engine, tracking

    work = tmp_path / "work"
    (work / "victim").mkdir(parents=True)
    (work / "victim" / "keep").write_text("x")
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fakebin / "srun").chmod(0o755)
    outside = {p.name for p in tmp_path.parent.iterdir()}
    monkeypatch.chdir(work)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    refused = accepted = 0
    env = tracking.environment(1, "cpu")  # the git and environment helpers, run from the working dir
    for field in FIELDS:
        for value in HOSTILE:
            p = work / "sweep.yaml"
            p.write_text(yaml.safe_dump(_hostile_sweep(field, value, tmp_path)))
            try:
                sweep = load_sweep(p)
            except ConfigError as e:
                leaf = field.split(".")[-1]
                assert leaf in str(e), f"{field}={value!r}: the error does not name the field:\n{e}"
                refused += 1
                continue
            accepted += 1
            runs = sweep.expand()
            for r in runs:
                d = engine.run_dir(r)
                assert re.fullmatch(r"[0-9a-f]{12}", d.name)
                engine.save_atomic({"w": torch.zeros(1)}, d / "final_weights.pt")
                assert (work / d).resolve().is_relative_to(work.resolve()), d
            s = Sweep(sweep, executor="local", say=lambda *a: None)
            assert s.folder.resolve().is_relative_to(work.resolve()), s.folder
            jf = jobs_file(sweep)
            jf.parent.mkdir(parents=True, exist_ok=True)
            jf.write_text("{}\n")
            assert jf.resolve().is_relative_to(work.resolve()), jf
            with pytest.raises(FileNotFoundError):
                ensure_data(runs, build=False)
            if field == "experiment":  # as an MLflow experiment, and in a run's tags and params
                exp = tracking.ensure_experiment(uri, sweep.experiment_name())
                run_logger.RunLogger(uri, exp, runs[-1]).log_params(env)
            # the sbatch script SLURM would run: bash executes it, srun is a stand-in
            ex = make_executor(sweep, "slurm", s.folder, 1, 1)
            script = tmp_path / "job.sh"
            script.write_text(ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "u"))
            args = tmp_path / "srun-args"
            subprocess.run(
                ["bash", str(script)],
                cwd=work,
                check=True,
                timeout=60,
                env=dict(os.environ, PATH=f"{fakebin}:{os.environ['PATH']}", SRUN_ARGS=str(args)),
            )
            assert str(s.folder) in args.read_text(), "the job folder did not reach srun verbatim"
    assert tracking.git_commit()
    assert refused >= 10 and accepted >= 10, (refused, accepted)
    assert (work / "victim" / "keep").is_file(), "a hostile value ran `rm -rf ./victim`"
    hits = _no_pwned(tmp_path, Path.cwd(), Path.home(), Path("/tmp"), ROOT)
    assert not hits, f"a shell ran a hostile value: {hits}"
    assert {p.name for p in tmp_path.parent.iterdir()} == outside, "files appeared next to the test's folder"


def test_hostile_names_through_the_cli(tmp_path):
    """`hfbench status` (loads, expands, reads MLflow and the job log) with hostile experiment and
    folder names."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = {
        "name": "hostile",
        "experiment": "$(touch pwned); `touch pwned` && touch pwned",
        "out_dir": "$(touch pwned)",
        "data_dir": "`touch pwned`",
        "launcher": {"executor": "local", "folder": "a;touch pwned"},
        "base": {"epochs": 2},
        "grid": {"methods": ["dense"]},
    }
    (work / "s.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["status", "s.yaml", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],):
        r = subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "dense" in r.stdout
    assert not _no_pwned(tmp_path, ROOT, Path.home(), Path("/tmp"))
    assert sorted(os.listdir(work)) == ["s.yaml"]  # neither command creates anything


# ============================================================================ paths
@pytest.mark.parametrize(
    "changes,field",
    [
        ({"name": ".."}, "name"),
        ({"name": "."}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "a\0b"}, "name"),
        ({"name": "..\\x"}, "name"),
        ({"out_dir": "../out"}, "out_dir"),
        ({"out_dir": "runs/../../out"}, "out_dir"),
        ({"out_dir": "runs\0"}, "out_dir"),
        ({"data_dir": "../../data"}, "data_dir"),
        ({"launcher": {"folder": "../submitit"}}, "folder"),
        ({"launcher": {"folder": "x/\0"}}, "folder"),
        ({"experiment": "exp\0"}, "experiment"),
    ],
    ids=lambda x: repr(x) if isinstance(x, dict) else x,
)
def test_path_components_cannot_climb(tmp_path, changes, field):
    d = {"name": "ok", "base": {"epochs": 2}, **changes}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert field in str(e.value)


def test_run_fields_cannot_climb():
    for k, v in (("out_dir", "../x"), ("data_dir", "a/../../b"), ("init_checkpoint", "../w.pt"), ("out_dir", "a\0")):
        with pytest.raises(ValueError, match=k):
            RunConfig(**{k: v})


def test_explicit_absolute_paths_and_harmless_names_are_accepted(tmp_path):
    """Absolute paths are the user's explicit choice; '..' inside a file name is not a climb;
    the experiment name never becomes a path."""
    from launchers.sweep import Sweep, jobs_file
    from suite import engine

    s = SweepConfig.model_validate(
        {
            "name": "v1..2",
            "experiment": "team/../x",
            "out_dir": str(tmp_path / "o"),
            "data_dir": str(tmp_path / ".." / "d"),
            "launcher": {"folder": str(tmp_path / "sub"), "executor": "local"},
        }
    )
    runs = s.expand()
    assert all(engine.run_dir(r).parent == tmp_path / "o" for r in runs)
    assert Sweep(s, executor="local").folder.parent.parent == tmp_path / "sub"
    assert jobs_file(s) == tmp_path / "sub" / "v1..2" / "jobs.jsonl"
    assert RunConfig(out_dir="runs/a..b").out_dir == "runs/a..b"


@pytest.mark.parametrize("case", ["world-writable", "group-writable", "other-owner"])
def test_shared_or_foreign_folders_are_refused_before_submission(tmp_path, betons, case):
    """Issue 21, case 6: a launcher folder (job pickles) or out_dir (checkpoints) that another
    user owns, or that group/others can write, would let them run code as the submitter. The
    sweep refuses it by field, exit 2, before any experiment or job exists."""
    import os
    import subprocess
    import sys

    target = tmp_path / ("runs" if case == "group-writable" else "sub")
    target.mkdir()
    if case == "world-writable":
        target.chmod(0o777)
    elif case == "group-writable":
        target.chmod(0o775)
    else:
        os.chown(target, 65534, 65534)  # nobody
        target.chmod(0o755)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: shared
tracking_uri: sqlite:///{tmp_path / "mlflow.db"}
data_dir: {betons["train"].parent}
out_dir: {tmp_path / "runs"}
base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 2}}
grid: {{methods: [magnitude], sparsities: [0.5], seeds: [0]}}
launcher: {{executor: local, folder: {tmp_path / "sub"}}}
""")
    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "sweep", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert r.returncode == 2, r.stdout + r.stderr
    field = "out_dir" if case == "group-writable" else "launcher.folder"
    assert r.stderr.startswith(f"hfbench: {field}: {target}") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
def test_files_a_run_writes_are_private_to_its_user(tmp_path, betons):
    """Everything the sweep and its task create (submitit pickles, logs, checkpoints, weights,
    the done marker) is readable and writable by the submitter only, whatever the umask."""
    import os
    import stat
    import subprocess
    import sys

    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"""
name: private
tracking_uri: sqlite:///{tmp_path / "mlflow.db"}
data_dir: {betons["train"].parent}
out_dir: {tmp_path / "runs"}
base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 2, batch_size: 16, init: scratch}}
grid: {{methods: [magnitude], sparsities: [0.5], seeds: [0]}}
launcher: {{executor: local, folder: {tmp_path / "sub"}, poll_s: 0.5}}
""")
    r = subprocess.run(
        ["bash", "-c", f"umask 000; exec {sys.executable} -m launchers.cli sweep {cfg}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    made = [p for root in (tmp_path / "runs", tmp_path / "sub") for p in [root, *root.rglob("*")]]
    assert any(p.name == "final_weights.pt" for p in made) and any(p.name.endswith("_submitted.pkl") for p in made)
    loose = [f"{p} {stat.S_IMODE(p.stat().st_mode):o}" for p in made if p.stat().st_mode & 0o077]
    assert not loose, loose


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_authenticated_tracking_server_takes_credentials_from_the_environment(tmp_path, betons):
    """Issue 21, case 6: on a shared cluster the MLflow server must not be open to every user.
    scripts/services.sh with HFBENCH_MLFLOW_AUTH=1 starts MLflow's basic-auth app and writes the
    user and password into its env.sh (mode 600). A sweep with them logs its run; a sweep
    without them is refused in one line (exit 2) before anything runs."""
    import stat
    import subprocess
    import sys
    import uuid

    root = Path(__file__).resolve().parents[1]
    state = tmp_path / "svc"
    env = {**os.environ, "HFBENCH_MLFLOW_AUTH": "1", "PYTHONPATH": str(root)}
    start = subprocess.run(
        ["bash", str(root / "scripts" / "services.sh"), "start", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        envsh = state / "env.sh"
        assert stat.S_IMODE(envsh.stat().st_mode) == 0o600
        creds = dict(re.findall(r"^export (\w+)='([^']*)'", envsh.read_text(), re.M))
        uri = creds["HFBENCH_MLFLOW_URI"]
        assert creds["MLFLOW_TRACKING_USERNAME"] and creds["MLFLOW_TRACKING_PASSWORD"]
        name = f"auth-{uuid.uuid4().hex[:6]}"
        cfg = tmp_path / "s.yaml"
        cfg.write_text(f"""
name: {name}
tracking_uri: {uri}
data_dir: {betons["train"].parent}
out_dir: {tmp_path / "runs"}
base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 2, batch_size: 16, init: scratch}}
grid: {{methods: [magnitude], sparsities: [0.5], seeds: [0]}}
launcher: {{executor: local, folder: {tmp_path / "sub"}, poll_s: 0.5}}
""")
        bare = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        bare["PYTHONPATH"] = str(root)
        refused = subprocess.run(
            [sys.executable, "-m", "launchers.cli", "sweep", str(cfg)],
            env=bare,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.count("\n") == 1 and "MLFLOW_TRACKING_USERNAME" in refused.stderr, refused.stderr
        assert not (tmp_path / "runs").exists()
        ok = subprocess.run(
            [sys.executable, "-m", "launchers.cli", "sweep", str(cfg)],
            env={
                **bare,
                "MLFLOW_TRACKING_USERNAME": creds["MLFLOW_TRACKING_USERNAME"],
                "MLFLOW_TRACKING_PASSWORD": creds["MLFLOW_TRACKING_PASSWORD"],
            },
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as e:  # the server itself refuses an anonymous read
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}", timeout=10)
        assert e.value.code == 401
    finally:
        subprocess.run(
            ["bash", str(root / "scripts" / "services.sh"), "stop", str(state)],
            env=env,
            capture_output=True,
            timeout=120,
        )
