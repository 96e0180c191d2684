"""sglang-semipd: semi-PD (SM-partitioned prefill/decode) serving backend for SGLang.

Importing the package is cheap: it pulls in neither torch nor SGLang. The SGLang version this
package is built against is :data:`SGLANG_PIN`; :mod:`sglang_semipd.patches` checks it.
"""

__version__ = "0.1.0"
SGLANG_PIN = "0.5.17"
