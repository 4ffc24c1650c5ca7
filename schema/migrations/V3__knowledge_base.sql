-- The knowledge base: articles retrieved for a chat message to ground the
-- model's prompt and to answer from the fallback chain's template step.
--
-- Search works the same for Chinese and English, with no extension and no
-- dependence on the server's locale or text-search parser: Ferry computes
-- each article's terms itself (workers/src/state/kb.rs): lower-cased Latin
-- words, lightly stemmed, without stop words, and the overlapping character
-- bigrams of CJK text (the scheme of Lucene's CJK analyzer). A query is cut
-- into terms the same way and matched with the GIN-indexed `&&` overlap;
-- ranking counts matched terms, title terms twice.
CREATE TABLE kb_articles (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    title       text NOT NULL,
    body        text NOT NULL,
    tags        text[] NOT NULL DEFAULT '{}',
    title_terms text[] NOT NULL,
    terms       text[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX kb_articles_terms ON kb_articles USING gin (terms);
CREATE INDEX kb_articles_tags ON kb_articles USING gin (tags);
