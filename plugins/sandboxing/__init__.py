"""What the sandbox plugins share: messages from a guest read safely (:mod:`.guestmsg`), static
checks of tenant Python (:mod:`.pysource`), a limited fork server that runs those checks outside the
kernel (:mod:`.isolated`), and the Linux calls confinement is built from (:mod:`.linux`)."""
