"""A deterministic synthetic product catalogue (title -> description) for the quickstart project.

    rows = catalogue_rows(240, seed=0)   # [{"title": ..., "content": ...}, ...]

Used through `data.path: builtin:catalogue`. The descriptions follow a regular house style, so a
small model learns it in a few dozen steps and the loss curve visibly falls.
"""
from __future__ import annotations

import random

PRODUCTS = {
    "mug": ("coffee", "dishwasher safe", "holds 350 ml"),
    "backpack": ("travel", "padded laptop sleeve", "water-resistant zips"),
    "lamp": ("desk", "dimmable warm light", "USB-C powered"),
    "notebook": ("dotted", "lay-flat binding", "120 gsm paper"),
    "water bottle": ("insulated", "keeps drinks cold for 24 hours", "leak-proof lid"),
    "chair": ("office", "adjustable lumbar support", "breathable mesh back"),
    "headphones": ("wireless", "40-hour battery", "foldable design"),
    "kettle": ("electric", "boils 1.7 litres in 4 minutes", "auto shut-off"),
    "blanket": ("throw", "machine washable", "150 x 200 cm"),
    "plant pot": ("ceramic", "drainage hole with saucer", "suits small succulents"),
    "wallet": ("slim", "six card slots", "RFID blocking"),
    "candle": ("scented", "burns for 40 hours", "soy wax"),
}
MATERIALS = ("bamboo", "stainless steel", "recycled cotton", "oak", "leather", "glass", "linen", "stoneware")
COLOURS = ("charcoal", "sage green", "ocean blue", "terracotta", "ivory", "mustard", "plum", "sand")
BRANDS = ("Nordhaven", "Kestrel & Co", "Ubuntu Home", "Maple Row", "Lumo", "Brightfield")
AUDIENCES = ("busy commuters", "students", "home cooks", "remote workers", "gift shoppers", "outdoor lovers")


def catalogue_row(rng: random.Random) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    style, feature_a, feature_b = PRODUCTS[product]
    material, colour = rng.choice(MATERIALS), rng.choice(COLOURS)
    brand, audience = rng.choice(BRANDS), rng.choice(AUDIENCES)
    title = f"{brand} {colour.title()} {material.title()} {style.title()} {product.title()}"
    content = (f"This {colour} {style} {product} from {brand} is made of {material}. "
               f"It has {feature_a} and {feature_b}. Made for {audience}.")
    return {"title": title, "content": content}


def catalogue_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` distinct rows, the same for the same seed."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(count * 50):
        row = catalogue_row(rng)
        if row["title"] not in seen:
            seen.add(row["title"])
            rows.append(row)
        if len(rows) == count:
            break
    return rows
