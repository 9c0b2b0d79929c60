"""The demo model's training text: short chat conversations in the V3.2 chat template, generated
here from templates and a small world of facts written for this project (no outside text, so no
license question). Deterministic: `conversations(seed)` always gives the same text.

Some turns can only be answered by looking far back (the name given in the first turn, asked for
three turns later), so the sparse attention has to select the right old keys.
"""

from __future__ import annotations

import random

from dsv32_jax.text.chat import encode_messages

COLORS = {"sky": "blue", "grass": "green", "banana": "yellow", "snow": "white", "coal": "black",
          "tomato": "red", "orange": "orange", "lemon": "yellow", "cloud": "white", "leaf": "green",
          "sea": "blue", "strawberry": "red", "night": "dark", "sun": "bright yellow",
          "cherry": "red", "frog": "green", "crow": "black", "milk": "white", "carrot": "orange",
          "plum": "purple"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa",
          "lion": "roar", "owl": "hoot", "pig": "oink", "horse": "neigh", "bee": "buzz",
          "frog": "ribbit", "mouse": "squeak", "goat": "maa", "snake": "hiss"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
             "happy": "sad", "open": "closed", "early": "late", "light": "dark", "old": "new",
             "full": "empty", "wet": "dry", "loud": "quiet", "hard": "soft", "left": "right"}
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Germany": "Berlin", "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi",
            "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "India": "New Delhi"}
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack",
         "Kate", "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy",
         "Zoe"]
PLACES = ["forest", "village", "garden", "castle", "river", "mountain", "farm", "city"]
ADJS = ["little", "brave", "clever", "sleepy", "happy", "curious", "kind", "tiny"]
ACTS = ["ran to the river", "looked at the stars", "sang a song", "ate an apple",
        "played with a friend", "read a book", "climbed a tree", "took a long nap"]
SPARSE = ["Sparse attention lets each token look only at the few earlier tokens that matter most, "
          "picked by a small and fast indexer.",
          "In sparse attention every query reads only its top-k keys, chosen by a lightning "
          "indexer, instead of every key in the context."]
SPARSE_Q = ["Explain sparse attention in one sentence.", "What is sparse attention?",
            "Explain sparse attention.", "How does sparse attention work?"]
GREETINGS = ["Hello!", "Hi!", "Good morning!", "Hey there!"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _qa(r: random.Random) -> tuple[str, str]:
    kind = r.randrange(9)
    if kind == 0:
        obj = r.choice(list(COLORS))
        return f"What color is the {obj}?", f"The {obj} is {COLORS[obj]}."
    if kind == 1:
        a = r.choice(list(SOUNDS))
        return f"What does a {a} say?", f"A {a} says {SOUNDS[a]}."
    if kind == 2:
        a, b = r.randrange(10), r.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 3:
        w = r.choice(list(OPPOSITES))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITES[w]}."
    if kind == 4:
        c = r.choice(list(CAPITALS))
        return f"What is the capital of {c}?", f"The capital of {c} is {CAPITALS[c]}."
    if kind == 5:
        n = r.randrange(3, 11)
        return f"Count to {NUMBERS[n]}.", ", ".join(str(i) for i in range(1, n + 1)) + "."
    if kind == 6:
        a, adj, place, act = r.choice(list(SOUNDS)), r.choice(ADJS), r.choice(PLACES), r.choice(ACTS)
        return (f"Tell me a story about a {a}.",
                f"Once upon a time, a {adj} {a} lived in the {place}. Every day the {a} {act}. "
                f"One night the {a} said {SOUNDS[a]} and everyone smiled. The end.")
    if kind == 7:
        i = r.randrange(len(SPARSE))
        return r.choice(SPARSE_Q), SPARSE[i]
    a = r.choice(list(SOUNDS))
    return f"Say something about a {a}.", f"A {a} is an animal. It says {SOUNDS[a]}."


def conversation(r: random.Random) -> str:
    messages = []
    name = None
    if r.random() < 0.4:
        name = r.choice(NAMES)
        messages += [{"role": "user", "content": f"{r.choice(GREETINGS)} My name is {name}."},
                     {"role": "assistant", "content": f"Nice to meet you, {name}! How can I help?"}]
    for _ in range(r.randrange(1, 4)):
        q, a = _qa(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if name is not None:
        messages += [{"role": "user", "content": r.choice(["What is my name?", "Do you remember my name?"])},
                     {"role": "assistant", "content": f"Your name is {name}."}]
    return encode_messages(messages, thinking_mode="chat")


def conversations(n: int = 6000, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [conversation(r) for _ in range(n)]


def write_corpus(path: str, n: int = 6000, seed: int = 0) -> str:
    """The corpus as a text file: one conversation per paragraph (blank-line separated)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(conversations(n, seed)) + "\n")
    return path
