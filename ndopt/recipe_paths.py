"""Where a recipe reference points (a file, or a shipped recipe's name), without importing torch:
`ndopt.recipe` loads recipes, `ndopt.cache` keys plans by their text."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ndopt.errors import RecipeError


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped in the `recipes` package, by name."""
    try:
        root = resources.files("recipes")
    except ModuleNotFoundError:
        return {}
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".yaml")}


def resolve_recipe_path(ref: str | Path) -> Path:
    path = Path(ref)
    if path.exists():
        return path
    shipped = shipped_recipes()
    if str(ref) in shipped:
        return shipped[str(ref)]
    raise RecipeError(f"recipe {str(ref)!r} is neither a file nor a shipped recipe; shipped: "
                      f"{', '.join(sorted(shipped)) or '(none)'}")
