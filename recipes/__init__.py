"""Recipes: one TOML file per model family, loaded by ``registry``; chat formats in ``chat_format``."""

from toolkit.recipes.registry import Recipe, TargetNotSupportedError, UnknownRecipeError, all_recipes, get_recipe

__all__ = ["Recipe", "TargetNotSupportedError", "UnknownRecipeError", "all_recipes", "get_recipe"]
