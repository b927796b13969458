"""Where the project's own files live (presets, sample data), found relative to the package."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = PROJECT_ROOT / "presets"
ASSETS_DIR = PROJECT_ROOT / "assets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no preset named {name!r}; presets: {', '.join(list_presets())}")
    return path
