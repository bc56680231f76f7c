-- Run once by the postgres image, as POSTGRES_USER, when its data volume is empty.
-- Optuna and MLflow each keep an alembic_version table, so they need separate databases.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
