"""The adversarial HTTP corpus (issue 15): docs/http-edge.md, row by row, over real sockets."""
