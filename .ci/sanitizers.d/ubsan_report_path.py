"""Send UBSan's reports to its own log_path (installed as a .pth hook by .ci/sanitizers).

With GCC, ASan and UBSan are two runtimes (libasan, libubsan) that each carry a copy of the
sanitizer common code. libubsan applies UBSAN_OPTIONS=log_path by calling the exported
__sanitizer_set_report_path, which the preloaded libasan interposes: the path lands in ASan's copy
and UBSan keeps writing to stderr, where a test's captured output (a forked child, a subprocess)
would hide it. Calling libubsan's own definition (dlsym through its handle) at interpreter start
fixes that for every Python process of the sanitizer run, forked children included (the runtime
reopens the file under the child's pid).
"""

import ctypes
import os

_path = next((option.partition("=")[2] for option in os.environ.get("UBSAN_OPTIONS", "").split(":")
              if option.startswith("log_path=")), None)
_runtime = next((entry for entry in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
                 if os.path.basename(entry).startswith("libubsan")), None)
if _path and _runtime:
    ctypes.CDLL(_runtime).__sanitizer_set_report_path(_path.encode())
