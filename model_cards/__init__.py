"""Model card templates (installed as `subquadratic.model_cards`)."""
