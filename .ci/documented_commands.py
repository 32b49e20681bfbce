"""Print the commands of a code block marked ``<!-- ci: NAME -->`` in a Markdown file, one per line:
``python3 .ci/documented_commands.py FILE NAME``.

CI runs them as written, so the documented install, test and build commands are the ones that
are tested. The marker is the line before the block's opening fence; comments after `` #`` go.
"""

import sys
from pathlib import Path

path, name = sys.argv[1:]
lines = Path(__file__).resolve().parent.parent.joinpath(path).read_text().splitlines()
start = lines.index(f"<!-- ci: {name} -->") + 1
if not lines[start].startswith("```"):
    sys.exit(f"{path}: the line after <!-- ci: {name} --> must open a code block")
for line in lines[start + 1 :]:
    if line.startswith("```"):
        break
    command = line.split(" #", 1)[0].strip()
    if command:
        print(command)
