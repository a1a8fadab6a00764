"""Procedural LOCO-style datasets: five categories with logical rules, defects and region masks.

``generate(out_root)`` writes all categories in the exact MVTec LOCO AD layout; see ``writer`` for
the layout guarantees and ``contact_sheet`` for a visual overview of one category.
"""

from engine.data.synthetic.categories import CATEGORIES, get_category
from engine.data.synthetic.writer import GENERATOR_VERSION, generate, generate_category

__all__ = ["CATEGORIES", "GENERATOR_VERSION", "generate", "generate_category", "get_category"]
