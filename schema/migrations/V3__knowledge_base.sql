-- The knowledge base: articles retrieved for a chat message to ground the
-- model's prompt and to answer from the fallback chain's template step.
--
-- Search works the same for Chinese and English without extensions or
-- locale settings: Ferry writes `title_terms`/`body_terms` itself
-- (workers/src/state/kb.rs): lower-cased Latin words and overlapping
-- character bigrams of CJK text, the scheme of Lucene's CJK analyzer. The
-- 'simple' configuration indexes them as they are.
CREATE TABLE kb_articles (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug       text NOT NULL UNIQUE,
    title      text NOT NULL,
    body       text NOT NULL,
    tags       text[] NOT NULL DEFAULT '{}',
    title_terms text NOT NULL,
    body_terms text NOT NULL,
    search     tsvector GENERATED ALWAYS AS (
                   setweight(to_tsvector('simple', title_terms), 'A')
                   || setweight(to_tsvector('simple', body_terms), 'D')
               ) STORED,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX kb_articles_search ON kb_articles USING gin (search);
CREATE INDEX kb_articles_tags ON kb_articles USING gin (tags);
