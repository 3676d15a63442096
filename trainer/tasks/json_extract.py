"""Structured extraction: a sentence about a person -> a one-line JSON object."""

from __future__ import annotations

import json
import random

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan",
         "Sofia", "Kwame", "Elena", "Noah", "Mei", "Lucas", "Amara", "Jonas", "Chloe", "Ravi",
         "Hana", "Diego", "Zara", "Felix", "Nadia", "Oscar", "Yuki", "Leila", "Marco", "Ines"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Khan",
        "Petrov", "Rossi", "Mensah", "Novak", "Martin", "Chen", "Moreau", "Okafor", "Berg",
        "Dubois", "Iyer", "Kim", "Garcia", "Ali", "Weber", "Hassan", "Nilsson", "Sato",
        "Rahimi", "Bianchi", "Costa"]
CITIES = ["Porto", "Denver", "Osaka", "Cairo", "Munich", "Lima", "Pune", "Leeds", "Lahore",
          "Kazan", "Turin", "Accra", "Brno", "Lyon", "Xiamen", "Nantes", "Lagos", "Bergen",
          "Quebec", "Mysore", "Busan", "Seville", "Dubai", "Graz", "Tunis", "Malmo", "Sendai",
          "Shiraz", "Genoa", "Recife"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city} for work.",
    "Our new colleague {name} ({age}) is based in {city}.",
    "{name}, aged {age}, was born and raised in {city}.",
]
INSTRUCTION = 'Extract the person as JSON with keys "name", "age" and "city".'


def make_example(rng: random.Random) -> dict[str, str]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age = rng.randint(18, 90)
    city = rng.choice(CITIES)
    text = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return {"prompt": f"{INSTRUCTION}\nText: {text}", "completion": answer}
