"""The CollectionLoRA distiller: config, plan, prepare, loop (:mod:`clora.distill.loop`), run."""
