import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_finds_the_embedded_default(tmp_path):
    """A non-editable install has no checkout around it: the shipped files must come from the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(tmp_path / "dist")],
        check=True,
        timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("yoloslim-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=600,
    )
    probe = (
        "from yoloslim.utils.assets import shipped_file; import yoloslim; "
        "print(yoloslim.__file__); print(shipped_file('data', 'synthetic.yaml'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    module, config = (Path(line) for line in result.stdout.split())
    assert module.is_relative_to(target) and config.is_relative_to(target)
    assert config.read_text() == (ROOT / "data" / "synthetic.yaml").read_text()

    shipped = {p.relative_to(target).as_posix() for p in (target / "yoloslim").rglob("*.py")}
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "yoloslim").rglob("*.py")}
    assert source <= shipped, f"modules missing from the wheel: {sorted(source - shipped)}"
    assets = {p.name for p in (target / "yoloslim" / "runtime" / "assets").iterdir()}
    assert {"selftest.onnx", "selftest.npz"} <= assets
