"""Guess-the-number: a multi-turn environment in RunRL's `CustomEnv` form.

`setup(**row)` gets every field of the prompt's line (`target`, `max_attempts`); `step(action)` gets the
model's reply and answers "higher" / "lower" until the guess is right or the attempts run out. A correct
guess earns 1; any reply holding a digit earns 0.1 (a shaping reward a randomly initialised model can find).
"""

import re

DIGIT = re.compile(r"\d")


class CustomEnv:
    def setup(self, **row):
        self.target = int(row["target"])
        self.attempts_left = int(row.get("max_attempts", 3))

    def step(self, action: str) -> dict:
        self.attempts_left -= 1
        match = DIGIT.search(action)
        if match is None:
            done = self.attempts_left <= 0
            return {"observation": "Please reply with one digit.", "reward": 0.0, "done": done,
                    "reward_info_dict": {"valid_guess": 0.0, "correct": 0.0}}
        guess = int(match.group())
        if guess == self.target:
            return {"observation": "Correct!", "reward": 1.0, "done": True,
                    "reward_info_dict": {"valid_guess": 1.0, "correct": 1.0}}
        hint = "higher" if guess < self.target else "lower"
        done = self.attempts_left <= 0
        return {"observation": f"No, {hint}. {self.attempts_left} attempt(s) left.", "reward": 0.1, "done": done,
                "reward_info_dict": {"valid_guess": 1.0, "correct": 0.0, "last_hint": hint}}
