"""Helper process for comparisons requested off the main thread: reads JSON [a, b] lines, writes true/false.

It runs each comparison on its own main thread, so the alarm bound applies here too; the parent kills the
process only if even that fails to return in time.
"""
import json
import sys

from ettrl.grading.equivalence import _math_verify, symbolic_equal


def main():
    _math_verify()  # import and warm the parser before announcing readiness
    print("ready", flush=True)
    for line in sys.stdin:
        a, b, seconds = json.loads(line)
        print(json.dumps(bool(symbolic_equal(a, b, seconds))), flush=True)


if __name__ == "__main__":
    main()
