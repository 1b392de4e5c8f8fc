"""How the gateway names its implementation to peers and in the files it writes.

Every A-ASSOCIATE-RQ and -AC the gateway sends carries its Implementation Class UID and
Implementation Version Name (PS3.7 D.3.3.2), and the File Meta Information of every file it
writes carries them as (0002,0012) and (0002,0013) (PS3.10 7.1): peers and tools that work
around a known implementation's behaviour by these values then see the gateway, not the
library it is built on.

The UID is derived from a UUID (PS3.5 B.2, the ``2.25`` root): it needs no organisation's
root and stays the same across releases (the class of implementation does not change); the
version name (1-16 characters of the default repertoire, PS3.7 D.3.3.2.2) follows the release.
"""

from __future__ import annotations

from typing import Final

from gateway import __version__

__all__ = ["IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION_NAME"]

# uuid 4b31d6b2-c97e-4d88-be7c-166535e43332 as an integer, under 2.25.
IMPLEMENTATION_CLASS_UID: Final = "2.25.99950876830564183790170387668900524850"
IMPLEMENTATION_VERSION_NAME: Final = f"DICOMGW_{__version__}"[:16]
