"""The per-host daemon: owns a hypervisor driver and speaks for its host on the bus."""
