import sys

from .launch import collision, collision_message

_path = collision()
if _path:  # `python -P -m worker` (or an installed package) beside an app's worker.py: refuse, as the script does
    print(collision_message(_path), file=sys.stderr)
    sys.exit(2)

from .cli import main  # noqa: E402

sys.exit(main())
