"""libvirt domain XML import and export for the VM spec.

:func:`spec_from_xml` turns the part of libvirt's domain XML that Fleetvisor can run into a
:class:`~protocols.vmspec.VmSpec`, refusing everything else with one :class:`DomainXmlError` that
lists each problem and its fix; :func:`spec_to_xml` writes a spec back out. ``docs/domxml.md``
describes what is mapped and what is refused, with examples.

Modules: ``vocabulary`` (the mapping table, as data), ``reader`` (XML to spec), ``writer`` (spec to
XML) and ``errors``. Like all of protocols, the package imports nothing of ours outside protocols;
both directions are pure: no I/O, no libvirt, stdlib ElementTree only.
"""

from __future__ import annotations

from protocols.domxml.errors import DomainXmlError
from protocols.domxml.reader import MAX_XML_BYTES, spec_from_xml
from protocols.domxml.vocabulary import FLEETVISOR_NS, FLEETVISOR_PREFIX
from protocols.domxml.writer import spec_to_xml

__all__ = [
    "FLEETVISOR_NS",
    "FLEETVISOR_PREFIX",
    "MAX_XML_BYTES",
    "DomainXmlError",
    "spec_from_xml",
    "spec_to_xml",
]
