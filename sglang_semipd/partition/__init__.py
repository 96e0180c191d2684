"""SM partitioning: split planning and the resize protocol (pure logic, no CUDA)."""
