"""The judge role: pure verdict logic (`rules`), the Serve apps (`apps`, `llm`), which
app each `judge.kind` deploys (`kinds`), and the loop's client (`client`)."""
