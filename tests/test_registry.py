"""Registry: entry points, duplicates, broken plugins, restricted loading, listing."""

import subprocess
import sys
import textwrap

import pytest

from core import hookimpl
from core.errors import UsageError
from core.registry import DuplicatePluginError, Registry

BUILT_INS = {"teacher": {"gmm", "checkpoint"}, "student": {"mlp", "copy"}, "objective": {"denoise"},
             "sampler": {"euler", "ddim", "multistep"}, "critic": {"fake-score"}, "dataset": {"gmm"}}


def test_built_ins_come_from_entry_points():
    reg = Registry()
    for kind, names in BUILT_INS.items():
        for name in names:
            assert reg.get(kind, name).dist == "fewstep", (kind, name)
    assert not reg.failed, reg.failed  # every built-in entry point imports (diffusers is imported lazily)


class _Dup:
    @staticmethod
    @hookimpl
    def register_teachers(register):
        register("gmm", lambda config, device: None)


def test_duplicate_name_names_both_plugins():
    reg = Registry()
    with pytest.raises(DuplicatePluginError, match=r"teacher 'gmm' is registered twice: by plugin 'gmm' \(fewstep\) "
                                                   r"and by plugin 'dup'"):
        reg.add(_Dup, name="dup", dist="dup-dist")


def test_unknown_plugin_lists_choices_and_suggests(monkeypatch):
    reg = Registry()
    with pytest.raises(UsageError, match=r"unknown sampler 'eulr' \(did you mean 'euler'\?\); available: .*ddim.*, euler"):
        reg.get("sampler", "eulr")


def test_local_plugin_add_and_remove():
    reg = Registry(load_entry_points=False)

    class Mine:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            register("mine", lambda *a, **k: None)

    reg.add(Mine, name="mine-plugin")
    assert reg.get("sampler", "mine").plugin == "mine-plugin"
    reg.remove("mine-plugin")
    with pytest.raises(UsageError):
        reg.get("sampler", "mine")


def test_unknown_hook_is_rejected():
    import pluggy

    class Typo:
        @staticmethod
        @hookimpl
        def register_teacher(register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError):
        Registry(load_entry_points=False).add(Typo, name="typo")


def _fake_dist(root, dist, entry_points: dict, modules: dict):
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[fewstep]\n{eps}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))


def _run(code, path, env_extra=None):
    import os

    env = {**os.environ, "PYTHONPATH": str(path), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


THIRD_PARTY = {
    "good_plugin": """
        from core import hookimpl
        def sampler(model, noise, times, cond=None, **kw):
            '''A third-party sampler.'''
            return noise
        @hookimpl
        def register_samplers(register):
            register("third", sampler)
    """,
    "broken_plugin": "import not_a_module_anywhere\n",
}


def test_third_party_broken_and_restricted(tmp_path):
    _fake_dist(tmp_path, "acme-fewstep", {"acme": "good_plugin", "broken": "broken_plugin"}, THIRD_PARTY)
    code = ("from core.registry import Registry; r = Registry(); i = r.get('sampler', 'third'); "
            "print(i.dist, i.plugin); print(sorted(r.failed))")
    only = {"FEWSTEP_PLUGINS": "acme,broken,samplers"}
    res = _run(code, tmp_path, only)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["acme-fewstep acme", "['broken']"]
    # the broken one is reported when asked for by name
    res = _run("from core.registry import Registry; Registry().get('sampler', 'broken')", tmp_path, only)
    assert "sampler plugin 'broken' failed to import: ModuleNotFoundError" in res.stderr
    # FEWSTEP_PLUGINS restricts loading; FEWSTEP_DISABLE_PLUGINS blocks
    res = _run("from core.registry import Registry; r = Registry(); print(sorted(r.names('sampler')), sorted(r.failed))",
               tmp_path, {"FEWSTEP_PLUGINS": "acme"})
    assert res.stdout.strip() == "['third'] []"
    res = _run("from core.registry import Registry; r = Registry(); print('third' in r.names('sampler'), 'broken' in r.failed)",
               tmp_path, {"FEWSTEP_DISABLE_PLUGINS": "acme,broken"})
    assert res.stdout.strip() == "False False"
    # `list` shows kind, distribution and origin
    res = subprocess.run([sys.executable, "-m", "core.run", "list"], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0
    assert "third            acme-fewstep (third-party)  A third-party sampler." in res.stdout
    assert "gmm              fewstep (built-in)" in res.stdout
    assert "failed to import: broken: ModuleNotFoundError" in res.stdout


def test_plugin_exiting_at_import_is_reported_and_skipped(tmp_path):
    """A plugin calling sys.exit() at import neither ends the CLI nor hides the other plugins."""
    _fake_dist(tmp_path, "exit-fewstep", {"exiter": "exiting_plugin"},
               {"exiting_plugin": "import sys\nsys.exit(3)\n"})
    res = subprocess.run([sys.executable, "-m", "core.run", "list"], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "failed to import: exiter: SystemExit: 3" in res.stdout
    assert "gmm              fewstep (built-in)" in res.stdout


def test_a_hook_failing_half_way_leaves_nothing_registered():
    class Half:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            register("half-first", lambda *a, **k: None)
            raise RuntimeError("broken after one registration")

    reg = Registry(load_entry_points=False)
    with pytest.raises(RuntimeError, match="broken after one registration"):
        reg.add(Half, name="half")
    assert "half-first" not in reg.names("sampler") and not reg.pm.has_plugin("half")
    reg.add(Half.__class__("Again", (), {}), name="half")  # the name is free again
