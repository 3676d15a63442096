"""Fixed answer style: the items named in a request -> a bulleted list, one per line."""

from __future__ import annotations

import random

ITEMS = ["eggs", "milk", "bread", "apples", "rice", "coffee", "tea", "butter", "cheese",
         "onions", "garlic", "tomatoes", "pasta", "flour", "sugar", "salt", "yogurt", "honey",
         "lemons", "carrots", "potatoes", "spinach", "oats", "beans", "olive oil", "soap",
         "batteries", "light bulbs", "tape", "envelopes", "stamps", "paper towels", "sponges",
         "dog food", "bananas", "grapes", "peppers", "mushrooms", "chicken", "tofu"]
OPENERS = ["I need to buy", "Please pick up", "We are out of", "Don't forget", "Can you get",
           "On the way home grab"]
INSTRUCTION = "List every item mentioned, in order, as a bulleted list."


def make_example(rng: random.Random) -> dict[str, str]:
    items = rng.sample(ITEMS, rng.randint(2, 5))
    spoken = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    text = f"{rng.choice(OPENERS)} {spoken}."
    return {"prompt": f"{INSTRUCTION}\n{text}", "completion": "\n".join(f"- {i}" for i in items)}
