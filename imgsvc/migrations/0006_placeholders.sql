-- Placeholders, computed with the pyramid and copied to every image of the same bytes (NULL until derived).
ALTER TABLE images
    ADD COLUMN thumbhash      text,  -- base64 ThumbHash
    ADD COLUMN dominant_color text,  -- #rrggbb
    ADD COLUMN average_color  text;  -- #rrggbb
