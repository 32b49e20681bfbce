"""Print the commands of the README's code block marked ``<!-- ci: NAME -->``, one per line.

CI runs them as written, so the README's install and test commands are the ones that are
tested. The marker is the line before the block's opening fence; comments after `` #`` go.
"""

import sys
from pathlib import Path

name = sys.argv[1]
lines = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text().splitlines()
start = lines.index(f"<!-- ci: {name} -->") + 1
if not lines[start].startswith("```"):
    sys.exit(f"README.md: the line after <!-- ci: {name} --> must open a code block")
for line in lines[start + 1 :]:
    if line.startswith("```"):
        break
    command = line.split(" #", 1)[0].strip()
    if command:
        print(command)
