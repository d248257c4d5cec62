-- The same database and roles `streamfold up` creates natively (app/local/postgres.py).
CREATE ROLE streamfold_writer LOGIN PASSWORD 'streamfold' CREATEDB;
CREATE ROLE streamfold_reader LOGIN PASSWORD 'streamfold';
CREATE DATABASE streamfold OWNER streamfold_writer;
\connect streamfold
REVOKE ALL ON DATABASE streamfold FROM PUBLIC;
GRANT CONNECT ON DATABASE streamfold TO streamfold_writer, streamfold_reader;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT ALL ON SCHEMA public TO streamfold_writer;
GRANT USAGE ON SCHEMA public TO streamfold_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE streamfold_writer IN SCHEMA public
  GRANT SELECT ON TABLES TO streamfold_reader;
