"""The shared screen: many VMs' framebuffers composed into one display.

``core`` holds the state without I/O (outputs, buffers, mailbox commits, flips, layout state),
``layout`` the viewport presets and aspect math, ``compose`` the composition with swscale.
Records exchanged with guests are in ``vmediad.abi``.
"""
