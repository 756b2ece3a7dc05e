"""Write synthetic conversations for `simplegpt train --sft`: one {"messages": [...]} per line.

    python examples/make_chats.py chats.jsonl [--n 2000] [--seed 0]

Two kinds of question a small model learns in minutes: which digit hides among the letters of a
string ("which digit is in qwk7bd?" -> "7": the answer must be read from the question, so new strings
test what was learned), and who wrote one of Shakespeare's plays. Each conversation has a short system
prompt, so the fine-tuned model also learns to ignore it.
"""

import argparse
import json
import random
import string

PLAYS = ["Hamlet", "Macbeth", "King Lear", "Othello", "The Tempest", "Twelfth Night", "Romeo and Juliet",
         "Julius Caesar", "As You Like It", "Much Ado About Nothing"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "Be concise.", ""]


def conversation(rng: random.Random) -> dict:
    if rng.random() < 0.8:
        letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7))]
        digit = rng.choice(string.digits)
        letters.insert(rng.randint(0, len(letters)), digit)
        question, answer = f"which digit is in {''.join(letters)}?", digit
    else:
        play = rng.choice(PLAYS)
        question, answer = f"who wrote {play}?", f"William Shakespeare wrote {play}."
    system = rng.choice(SYSTEMS)
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="conversations (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8") as f:
        for _ in range(args.n):
            f.write(json.dumps(conversation(rng)) + "\n")


if __name__ == "__main__":
    main()
