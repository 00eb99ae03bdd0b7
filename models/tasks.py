"""The built-in synthetic instruction mix: small tasks in the spirit of instruction tuning.

    reverse: river apple stone        -> stone apple river        (word order reversed)
    sort: q d x a                     -> a d q x                  (letters in alphabetical order)
    spell out: 4721                   -> four thousand seven hundred twenty-one
    date: 7 March 2021 / March 7, 2021 / 03/07/2021  -> 2021-03-07  (US month/day/year for the numeric form)

Every answer is a function of its instruction, so exact match is the metric. Held-out examples are
drawn with their own seed and never appear in training (`training_batches` skips their sources).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, timedelta

TASKS = ("reverse", "sort", "spell out", "date")

WORDS = ("apple", "river", "stone", "cloud", "tiger", "piano", "garden", "silver", "window", "candle",
         "forest", "rocket", "honey", "mirror", "castle", "pepper", "lemon", "ocean", "violin", "desert",
         "jacket", "planet", "butter", "meadow", "anchor", "bridge", "coffee", "dragon", "harbor", "island")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
MAX_NUMBER = 9999
FIRST_DAY, LAST_DAY = date(1950, 1, 1), date(2049, 12, 31)


def number_to_words(n: int) -> str:
    """0 <= n <= 9999 in English words, e.g. 4721 -> "four thousand seven hundred twenty-one"."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"n={n}: expected 0..{MAX_NUMBER}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_to_words(n % 100))
    return ONES[n // 1000] + " thousand" + ("" if n % 1000 == 0 else " " + number_to_words(n % 1000))


def make_example(rng: random.Random, task: str) -> tuple[str, str]:
    """One (instruction, answer) pair of `task`."""
    if task == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 6))
        return "reverse: " + " ".join(words), " ".join(reversed(words))
    if task == "sort":
        letters = rng.sample(LETTERS, rng.randint(3, 7))
        return "sort: " + " ".join(letters), " ".join(sorted(letters))
    if task == "spell out":
        n = rng.randint(0, MAX_NUMBER)
        return f"spell out: {n}", number_to_words(n)
    if task == "date":
        day = FIRST_DAY + timedelta(days=rng.randint(0, (LAST_DAY - FIRST_DAY).days))
        written = rng.choice((f"{day.day} {MONTHS[day.month - 1]} {day.year}",
                              f"{MONTHS[day.month - 1]} {day.day}, {day.year}",
                              f"{day.month:02d}/{day.day:02d}/{day.year}"))
        return f"date: {written}", day.isoformat()
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def held_out_examples(per_task: int, seed: int = 1234) -> list[tuple[str, str]]:
    """`per_task` distinct examples of each task, in task order."""
    rng = random.Random(seed)
    examples: list[tuple[str, str]] = []
    for task in TASKS:
        seen: set[str] = set()
        while len(seen) < per_task:
            source, target = make_example(rng, task)
            if source not in seen:
                seen.add(source)
                examples.append((source, target))
    return examples


def training_batches(batch_size: int, exclude: set[str], seed: int = 0) -> Iterator[list[tuple[str, str]]]:
    """An endless stream of batches, tasks mixed uniformly, never an instruction in `exclude`."""
    rng = random.Random(seed)
    while True:
        batch = []
        while len(batch) < batch_size:
            source, target = make_example(rng, rng.choice(TASKS))
            if source not in exclude:
                batch.append((source, target))
        yield batch
